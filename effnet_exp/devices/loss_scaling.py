"""Loss scaling for float16 training: the overflow counter and the step of any loss-scale optimizer, and the GPU one.

- device=gpu device.mixed_precision=true: tf.compat.v1.train.experimental.MixedPrecisionLossScaleOptimizer with a
  DynamicLossScale (or a FixedLossScale) around the optimizer; the session config turns on Grappler's
  auto_mixed_precision rewrite (gpu.py). Together that is what enable_mixed_precision_graph_rewrite does on
  TF 1.15 and TF 2.x, minus its process-wide switch. Variables stay float32.
- device=ascend (ascend.py): npu_bridge's NPULossScaleOptimizer with a FixedLossScaleManager or an
  ExponentialUpdateLossScaleManager, whenever device.precision_mode computes in float16.

Either way a step whose gradients overflow is skipped by the loss-scale optimizer (the global step still counts)
and counted in the variable `loss_scale/overflow_steps`.
"""
import logging

import tensorflow as tf

from effnet_exp.devices.distribute import all_replicas_finite

log = logging.getLogger(__name__)

OVERFLOW_COUNTER = "loss_scale/overflow_steps"


class OverflowCounter(object):
    """An int64 variable counting the skipped (overflow) steps; saved in the checkpoints."""

    def __init__(self):
        # Under device.strategy every replica records the same (all-replica) flag: the first replica's counts.
        self.variable = tf.compat.v1.get_variable(
            OVERFLOW_COUNTER, shape=[], dtype=tf.int64, initializer=tf.compat.v1.zeros_initializer(),
            trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def record(self, finite):
        return tf.compat.v1.assign_add(self.variable, tf.where(finite, tf.constant(0, tf.int64),
                                                               tf.constant(1, tf.int64))).op


class LossScaling(object):
    """The loss-scale optimizer around `optimizer`, and what the training step needs from it."""

    def __init__(self, optimizer, scale, counter, count_own_overflows):
        self.optimizer = optimizer
        self.scale = scale  # a variable (dynamic) or a tensor (fixed)
        self.counter = counter
        self._count_own = count_own_overflows

    def apply_gradients(self, grads_and_vars, global_step):
        """The update, skipped by the loss-scale optimizer on overflow; the global step counts either way."""
        update = self.optimizer.apply_gradients(grads_and_vars)
        updates = [update]
        if self._count_own:
            grads = [g for g, _ in grads_and_vars if g is not None]
            finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
            # Under device.strategy the loss-scale optimizer skips a step when any replica overflowed.
            updates.append(self.counter.record(all_replicas_finite(finite)))
        with tf.control_dependencies(updates):
            return tf.group(tf.compat.v1.assign_add(global_step, 1), name="train_step")

    def monitors(self, train_op):
        """Tensors read after train_op: the overflow count so far and the current loss scale."""
        with tf.control_dependencies([train_op]):
            scale = self.scale.read_value() if isinstance(self.scale, tf.Variable) else tf.identity(self.scale)
            return {"overflow_steps": self.counter.variable.read_value(), "loss_scale": tf.cast(scale, tf.float32)}


def new_overflow_counter():
    with tf.compat.v1.variable_scope("", reuse=tf.compat.v1.AUTO_REUSE):
        return OverflowCounter()


def gpu_loss_scaling(optimizer, cfg):
    """(MixedPrecisionLossScaleOptimizer around optimizer, its LossScaling) for device.loss_scale cfg."""
    experimental = tf.compat.v1.train.experimental
    if cfg.scale == "dynamic":
        scale = experimental.DynamicLossScale(initial_loss_scale=cfg.init_scale,
                                              increment_period=cfg.incr_every_n_steps, multiplier=cfg.incr_ratio)
    else:
        scale = experimental.FixedLossScale(float(cfg.scale))
    wrapped = experimental.MixedPrecisionLossScaleOptimizer(optimizer, scale)
    log.info("mixed precision: float16 graph rewrite, %s loss scale", cfg.scale)
    # The dynamic scale's variable (a private attribute of both TF versions), else its tensor.
    current = getattr(scale, "_current_loss_scale", None)
    current = current if isinstance(current, tf.Variable) else scale()
    return wrapped, LossScaling(wrapped, current, new_overflow_counter(), count_own_overflows=True)
