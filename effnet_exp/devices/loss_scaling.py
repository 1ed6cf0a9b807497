"""Loss scaling for float16 training, and the data-parallel optimizer wrappers of each device.

- device=gpu device.mixed_precision=true: tf.compat.v1.train.experimental.MixedPrecisionLossScaleOptimizer with a
  DynamicLossScale (or a FixedLossScale) around the optimizer; the session config turns on Grappler's
  auto_mixed_precision rewrite (session.py). Together that is what enable_mixed_precision_graph_rewrite does on
  TF 1.15 and TF 2.x, minus its process-wide switch. Variables stay float32.
- device=ascend: npu_bridge's NPUDistributedOptimizer (gradients averaged over the ranks, when RANK_SIZE > 1)
  inside NPULossScaleOptimizer with a FixedLossScaleManager or an ExponentialUpdateLossScaleManager, whenever
  device.precision_mode computes in float16.

Either way a step whose gradients overflow is skipped by the loss-scale optimizer (the global step still counts)
and counted in the variable `loss_scale/overflow_steps`.
"""
import logging

import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.optional import npu

log = logging.getLogger(__name__)

OVERFLOW_COUNTER = "loss_scale/overflow_steps"


def check_loss_scale_config(cfg, key="device.loss_scale"):
    if cfg.scale not in ("dynamic", "none"):
        try:
            value = float(cfg.scale)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise UserError("{}.scale={!r} is not dynamic, none or a number >= 1".format(key, cfg.scale))
    if cfg.init_scale < 1:
        raise UserError("{}.init_scale={} must be >= 1".format(key, cfg.init_scale))
    if cfg.incr_every_n_steps < 1 or cfg.decr_every_n_nan_or_inf < 1:
        raise UserError("{}.incr_every_n_steps and .decr_every_n_nan_or_inf must be >= 1".format(key))
    if cfg.incr_ratio <= 1 or not 0 < cfg.decr_ratio < 1:
        raise UserError("{}.incr_ratio must be > 1 and .decr_ratio in (0, 1) (got {}, {})".format(
            key, cfg.incr_ratio, cfg.decr_ratio))


def loss_scaling_wanted(device_cfg):
    """Whether this device config trains with loss scaling."""
    from effnet_exp.devices.session import FLOAT16_PRECISION_MODES

    scale_cfg = getattr(device_cfg, "loss_scale", None)
    if scale_cfg is None or scale_cfg.scale == "none":
        return False
    if device_cfg.name == "gpu":
        return bool(device_cfg.mixed_precision)
    if device_cfg.name == "ascend":
        return device_cfg.precision_mode in FLOAT16_PRECISION_MODES
    return False


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
            from effnet_exp.devices.strategy import all_replicas_finite

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


def _gpu_loss_scale(cfg):
    experimental = tf.compat.v1.train.experimental
    if cfg.scale == "dynamic":
        return experimental.DynamicLossScale(initial_loss_scale=cfg.init_scale,
                                             increment_period=cfg.incr_every_n_steps, multiplier=cfg.incr_ratio)
    return experimental.FixedLossScale(float(cfg.scale))


def _counting_manager(manager_class, counter):
    """A subclass of npu_bridge's loss-scale manager that also counts the steps the optimizer reports as not
    finite: NPULossScaleOptimizer hands its overflow status (the NPU float status, all-reduced when
    distributed) to manager.update_loss_scale(is_overall_finite) on every step."""

    class CountingLossScaleManager(manager_class):
        def update_loss_scale(self, finite_grads):
            return tf.group(super(CountingLossScaleManager, self).update_loss_scale(finite_grads),
                            counter.record(finite_grads))

    return CountingLossScaleManager


def _ascend_manager(cfg, counter):
    if cfg.scale == "dynamic":
        manager = _counting_manager(npu("ExponentialUpdateLossScaleManager"), counter)
        return manager(init_loss_scale=cfg.init_scale, incr_every_n_steps=cfg.incr_every_n_steps,
                       decr_every_n_nan_or_inf=cfg.decr_every_n_nan_or_inf, incr_ratio=cfg.incr_ratio,
                       decr_ratio=cfg.decr_ratio)
    manager = _counting_manager(npu("FixedLossScaleManager"), counter)
    return manager(loss_scale=float(cfg.scale), enable_overflow_check=True)


def wrap_optimizer(optimizer, device_cfg, parallel):
    """(optimizer to use, LossScaling or None) for the device: the data-parallel and loss-scale wrappers."""
    if device_cfg.name == "ascend" and parallel.size > 1:
        # Averages the gradients over the RANK_SIZE processes with HCCL's allreduce.
        optimizer = npu("NPUDistributedOptimizer")(optimizer)
    if not loss_scaling_wanted(device_cfg):
        return optimizer, None
    cfg = device_cfg.loss_scale
    with tf.compat.v1.variable_scope("", reuse=tf.compat.v1.AUTO_REUSE):
        counter = OverflowCounter()
    if device_cfg.name == "gpu":
        scale = _gpu_loss_scale(cfg)
        wrapped = tf.compat.v1.train.experimental.MixedPrecisionLossScaleOptimizer(optimizer, scale)
        log.info("mixed precision: float16 graph rewrite, %s loss scale", cfg.scale)
        # The dynamic scale's variable (a private attribute of both TF versions), else its tensor.
        current = getattr(scale, "_current_loss_scale", None)
        current = current if isinstance(current, tf.Variable) else scale()
        return wrapped, LossScaling(wrapped, current, counter, count_own_overflows=True)
    manager = _ascend_manager(cfg, counter)
    wrapped = npu("NPULossScaleOptimizer")(optimizer, manager, is_distributed=parallel.size > 1)
    log.info("precision_mode %s: NPU loss scaling, %s scale", device_cfg.precision_mode, cfg.scale)
    return wrapped, LossScaling(wrapped, manager.get_loss_scale(), counter, count_own_overflows=False)
