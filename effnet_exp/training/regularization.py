"""The recipe's regularisers: L2 weight decay, gradient clipping and an exponential moving average of the weights."""
import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.model.restore import EMA_SUFFIX

# Batch-norm parameters live under .../tpu_batch_normalization*/gamma|beta (and batch_normalization* in
# other builders); the reference excludes every variable whose name contains batch_normalization.
BATCH_NORM_MARK = "batch_normalization"


def check_recipe_config(train_cfg):
    if not 0 <= train_cfg.label_smoothing < 1:
        raise UserError("train.label_smoothing={} must be in [0, 1)".format(train_cfg.label_smoothing))
    if train_cfg.weight_decay < 0:
        raise UserError("train.weight_decay={} must be >= 0".format(train_cfg.weight_decay))
    if train_cfg.ema_decay is not None and not 0 < train_cfg.ema_decay < 1:
        raise UserError("train.ema_decay={} must be in (0, 1), or null for no moving average".format(
            train_cfg.ema_decay))
    if train_cfg.clip_grad_norm is not None and train_cfg.clip_grad_norm <= 0:
        raise UserError("train.clip_grad_norm={} must be > 0, or null for no clipping".format(
            train_cfg.clip_grad_norm))


def decayed_variables(variables):
    """Kernels and biases: every variable but batch-norm gamma/beta."""
    return [v for v in variables if BATCH_NORM_MARK not in v.op.name]


def weight_decay_loss(variables, weight_decay):
    """weight_decay * sum(l2_loss(v)) over decayed_variables(variables)."""
    decayed = decayed_variables(variables)
    with tf.name_scope("weight_decay"):
        return tf.multiply(weight_decay, tf.add_n([tf.nn.l2_loss(v) for v in decayed]), name="l2_loss")


def clip_gradients(grads_and_vars, clip_norm):
    """Gradients clipped to a global norm of clip_norm (no-op when it is None)."""
    if not clip_norm:
        return grads_and_vars
    pairs = [(g, v) for g, v in grads_and_vars if g is not None]
    clipped, _ = tf.clip_by_global_norm([g for g, _ in pairs], clip_norm, name="clip_by_global_norm")
    return [(g, v) for g, (_, v) in zip(clipped, pairs)]


class WeightsAverage(object):
    """tf.train.ExponentialMovingAverage(decay, num_updates=global_step) over the model's weights and batch-norm
    statistics, updated after each step; the shadows are named <var>/ExponentialMovingAverage like the
    official checkpoints', so the evaluator and model.pretrained_weights=ema read them."""

    def __init__(self, decay, global_step, variables):
        self.variables = list(variables)
        self.ema = tf.compat.v1.train.ExponentialMovingAverage(decay, num_updates=global_step)
        self._decay = decay
        self.apply_op = None
        self.reset_op = None
        self.shadows = []

    def after(self, train_op):
        """An op that runs train_op, then updates the averages."""
        with tf.control_dependencies([train_op]):
            self.apply_op = self.ema.apply(self.variables)
        self.shadows = [self.ema.average(v) for v in self.variables]
        for var, shadow in zip(self.variables, self.shadows):
            if shadow.op.name != var.op.name + EMA_SUFFIX:
                raise RuntimeError("moving average {} is not named {}{}".format(shadow.op.name, var.op.name,
                                                                               EMA_SUFFIX))
        # Sets every average to its variable's current value: run after pretrained weights are restored.
        self.reset_op = tf.group(*[tf.compat.v1.assign(s, v.read_value())
                                   for v, s in zip(self.variables, self.shadows)], name="ema_reset")
        return self.apply_op
