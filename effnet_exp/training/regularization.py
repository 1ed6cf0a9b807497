"""The recipe's regularisers: L2 weight decay, gradient clipping and an exponential moving average of the weights."""
import tensorflow as tf

from effnet_exp.model.restore import EMA_SUFFIX

# Batch-norm parameters live under .../tpu_batch_normalization*/gamma|beta (and batch_normalization* in
# other builders); the reference excludes every variable whose name contains batch_normalization.
BATCH_NORM_MARK = "batch_normalization"


def decayed_variables(variables):
    """Kernels and biases: every variable but batch-norm gamma/beta."""
    return [v for v in variables if BATCH_NORM_MARK not in v.op.name]


def weight_decay_loss(variables, weight_decay):
    """weight_decay * sum(l2_loss(v)) over decayed_variables(variables)."""
    decayed = decayed_variables(variables)
    with tf.name_scope("weight_decay"):
        return tf.multiply(weight_decay, tf.add_n([tf.nn.l2_loss(v) for v in decayed]), name="l2_loss")


def clip_gradients(grads_and_vars, clip_norm, replicas=1):
    """Gradients clipped to a global norm of clip_norm (no-op when it is None).

    Under a tf.distribute strategy (replicas > 1, called in the replica context) the norm that counts is the one
    of the gradient the optimizer will apply, the sum over the replicas: each replica all-reduces its gradients,
    clips that sum, and hands on 1 / replicas of it, since apply_gradients sums the replicas' gradients again."""
    if not clip_norm:
        return grads_and_vars
    pairs = [(g, v) for g, v in grads_and_vars if g is not None]
    grads = [g for g, _ in pairs]
    if replicas > 1:
        grads = _sum_over_replicas(grads, [v for _, v in pairs])
    clipped, _ = tf.clip_by_global_norm(grads, clip_norm, name="clip_by_global_norm")
    if replicas > 1:
        clipped = [g / replicas for g in clipped]
    return [(g, v) for g, (_, v) in zip(clipped, pairs)]


def _sum_over_replicas(grads, variables):
    """Each replica's gradients summed over the replicas, in the replica context (on TF 2.x
    ReplicaContext.all_reduce wraps this in a custom gradient that cannot find mirrored variables by name)."""
    def merge(strategy, *per_replica):
        return strategy.extended.batch_reduce_to(tf.distribute.ReduceOp.SUM, list(zip(per_replica, variables)))

    return list(tf.distribute.get_replica_context().merge_call(merge, args=tuple(grads)))


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
