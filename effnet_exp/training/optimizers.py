"""The optimizers of `conf/optimizer/`, as tf.compat.v1.train optimizers."""
import tensorflow as tf

from effnet_exp.errors import UserError

OPTIMIZERS = ("sgd_nesterov", "momentum", "rmsprop", "adam", "sgd")


def build_optimizer(opt_cfg, learning_rate):
    name = opt_cfg.name
    train = tf.compat.v1.train
    if name == "sgd_nesterov":
        return train.MomentumOptimizer(learning_rate, opt_cfg.momentum, use_nesterov=True)
    if name == "momentum":
        return train.MomentumOptimizer(learning_rate, opt_cfg.momentum, use_nesterov=opt_cfg.nesterov)
    if name == "rmsprop":
        return train.RMSPropOptimizer(learning_rate, decay=opt_cfg.decay, momentum=opt_cfg.momentum,
                                      epsilon=opt_cfg.epsilon)
    if name == "adam":
        return train.AdamOptimizer(learning_rate, beta1=opt_cfg.beta1, beta2=opt_cfg.beta2,
                                   epsilon=opt_cfg.epsilon)
    if name == "sgd":
        return train.GradientDescentOptimizer(learning_rate)
    raise UserError("optimizer.name={!r} is not one of {}".format(name, ", ".join(OPTIMIZERS)))


def check_training_config(cfg):
    """The recipe, schedule and device-loop fields of the run config; one UserError naming the key at fault."""
    from effnet_exp.training.regularization import check_recipe_config
    from effnet_exp.training.schedules import check_schedule_config

    check_schedule_config(cfg.optimizer.schedule)
    check_recipe_config(cfg.train)
    loop = getattr(cfg.device, "iterations_per_loop", 1)
    if loop > 1:
        train = cfg.train
        for key, value in (("train.log_every", train.log_every), ("train.checkpoint_every", train.checkpoint_every),
                           ("train.eval_every", train.eval_every), ("train.steps", train.steps)):
            if value and value % loop:
                raise UserError("{}={} must be a multiple of device.iterations_per_loop={} (each sess.run "
                                "trains that many steps)".format(key, value, loop))


class StepWatch(object):
    """Reads the per-run monitors of the training step (learning rate, loss-scale overflows) for the loop.

    With loss scaling on, a step whose gradients overflowed was skipped by the loss-scale optimizer: it is
    counted and logged, not treated as a NaN fault by train.nonfinite_policy, unless the loss itself stays
    non-finite for train.max_nonfinite_steps such steps in a row.
    """

    def __init__(self, max_nonfinite_steps):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.lr = None
        self.overflow_steps = None  # the counter's value after the last run (set after restore)
        self.loss_scale = None
        self.nonfinite_streak = 0

    def skipped(self, step, loss, extra):
        """Notes one sess.run's monitors; True when its step overflowed and the update was skipped."""
        import logging

        import numpy as np

        self.lr = extra.get("lr", self.lr)
        if "overflow_steps" not in extra:
            return False
        count, self.loss_scale = int(extra["overflow_steps"]), float(extra["loss_scale"])
        new = count - (self.overflow_steps if self.overflow_steps is not None else count)
        self.overflow_steps = count
        if new <= 0:
            self.nonfinite_streak = 0
            return False
        logging.getLogger(__name__).info(
            "step %d: gradient overflow, update skipped (%d overflow steps so far); loss scale now %g",
            step, count, self.loss_scale)
        if np.all(np.isfinite(loss)):
            self.nonfinite_streak = 0
            return True
        self.nonfinite_streak += 1
        if self.nonfinite_streak >= self.max_nonfinite_steps:
            raise UserError("loss was {} for {} steps in a row up to step {} even with loss scaling (scale now "
                            "{:g}); lower optimizer.lr".format(loss, self.nonfinite_streak, step, self.loss_scale))
        return True
