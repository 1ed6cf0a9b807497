"""Learning-rate schedules (`optimizer.schedule`): functions of the global step, so a resumed run continues at
the right rate. Each has a graph form (`learning_rate`) and the same formula in Python (`learning_rate_at`).

- constant: lr.
- exponential (the reference EfficientNet recipe): lr * decay_rate ^ (step / decay_steps), the exponent floored
  with staircase; during the warmup lr * step / warmup_steps instead.
- cosine: 0.5 * lr * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) after the warmup.

lr itself is optimizer.lr, times global_batch / scale_batch when schedule.scale_batch > 0 (the reference:
0.016 per 256 images, so 0.128 at a global batch of 2048).
"""
import math

import tensorflow as tf

from effnet_exp.training.config import ScheduleName

class Schedule(object):
    """The schedule in steps: base_lr, warmup_steps, decay_steps, total_steps."""

    def __init__(self, opt_cfg, global_batch, steps_per_epoch, total_steps):
        cfg = opt_cfg.schedule
        self.name = ScheduleName(cfg.name)
        self.base_lr = float(opt_cfg.lr)
        self.scaling = None
        if cfg.scale_batch:
            self.base_lr *= float(global_batch) / cfg.scale_batch
            self.scaling = "optimizer.lr {:g} x global batch {} / optimizer.schedule.scale_batch {}".format(
                opt_cfg.lr, global_batch, cfg.scale_batch)
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.decay_steps = max(cfg.decay_epochs * steps_per_epoch, 1e-9)
        self.decay_rate = float(cfg.decay_rate)
        self.staircase = bool(cfg.staircase)
        self.total_steps = max(int(total_steps), self.warmup_steps + 1)

    def describe(self):
        text = "learning rate {:.4g} ({}{})".format(self.base_lr, self.name.value,
                                                    "; " + self.scaling if self.scaling else "")
        if self.name == ScheduleName.exponential:
            text += ", x{} every {:.1f} steps".format(self.decay_rate, self.decay_steps)
        elif self.name == ScheduleName.cosine:
            text += " to 0 at step {}".format(self.total_steps)
        if self.warmup_steps:
            text += ", linear warmup over {} steps".format(self.warmup_steps)
        return text

    def at(self, step):
        """The rate at a global step, in Python (for logs and tests)."""
        step = float(step)
        if self.warmup_steps and step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        if self.name == ScheduleName.exponential:
            exponent = step / self.decay_steps
            return self.base_lr * self.decay_rate ** (math.floor(exponent) if self.staircase else exponent)
        if self.name == ScheduleName.cosine:
            progress = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
            return 0.5 * self.base_lr * (1.0 + math.cos(math.pi * progress))
        return self.base_lr

    def tensor(self, global_step):
        """The same rate as a float32 tensor of the global step."""
        with tf.name_scope("learning_rate"):
            if self.name == ScheduleName.constant and not self.warmup_steps:
                return tf.constant(self.base_lr, tf.float32, name="learning_rate")
            step = tf.cast(global_step, tf.float64)
            base = tf.constant(self.base_lr, tf.float64)
            if self.name == ScheduleName.exponential:
                exponent = step / self.decay_steps
                if self.staircase:
                    exponent = tf.floor(exponent)
                lr = base * tf.pow(tf.constant(self.decay_rate, tf.float64), exponent)
            elif self.name == ScheduleName.cosine:
                progress = tf.minimum((step - self.warmup_steps) / float(self.total_steps - self.warmup_steps), 1.0)
                lr = 0.5 * base * (1.0 + tf.cos(math.pi * progress))
            else:
                lr = base
            if self.warmup_steps:
                lr = tf.where(step < self.warmup_steps, base * step / self.warmup_steps, lr)
            return tf.cast(lr, tf.float32, name="learning_rate")
