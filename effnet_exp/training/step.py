"""The training step, built in one call that returns everything the loop needs (it writes nothing elsewhere).

build_train_step: the replica step (forward, loss, gradients, the update) replicated by the device, then once per
step the weights' moving average, then the device loop; and what runs once the session has its variables (the
average's reset, the rank-0 broadcast, the loop variables).
"""
import logging
from collections import namedtuple

import tensorflow as tf

from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.restore import HEAD_SCOPE, model_variables
from effnet_exp.training import mixing
from effnet_exp.training.config import NonFinitePolicy
from effnet_exp.training.metrics import soft_cross_entropy, top_k_accuracy
from effnet_exp.training.optimizers import build_optimizer
from effnet_exp.training.regularization import WeightsAverage, clip_gradients, weight_decay_loss
from effnet_exp.training.schedules import Schedule

log = logging.getLogger(__name__)


class TrainStep(namedtuple("TrainStep", "train_op loss top1 monitors schedule steps_per_run average broadcast loop "
                                        "overflow_counter")):
    """train_op runs steps_per_run steps; loss / top1 / monitors ({"lr", and with loss scaling "overflow_steps",
    "loss_scale"}) are read with it."""
    __slots__ = ()

    def fetches(self):
        return [self.train_op, self.loss, self.top1, self.monitors]

    def initialize(self, sess, resumed):
        """After init or restore: the averages start at the restored weights (unless resumed with their own), every
        process takes rank 0's variables, the device loop is loaded. Returns the overflow count so far."""
        if self.average is not None and not resumed:
            sess.run(self.average.reset_op)
        if self.broadcast is not None:
            sess.run(self.broadcast)
            log.info("variables broadcast from rank 0")
        self.loop.load(sess)
        return int(sess.run(self.overflow_counter)) if self.overflow_counter is not None else 0


def trained_variables(model_name, freeze_backbone):
    variables = tf.compat.v1.trainable_variables()
    if freeze_backbone:
        head = model_name + "/" + HEAD_SCOPE
        variables = [v for v in variables if v.op.name.startswith(head)]
    return variables


def build_train_step(spec, replicas, inputs, global_step):
    """The TrainStep of spec on spec.device, replicated by `replicas`, reading `inputs` (images, labels)."""
    cfg, device = spec.cfg, spec.device
    schedule = Schedule(cfg.optimizer, cfg.train.batch_size, spec.steps_per_epoch, spec.total_steps)
    scalings = []  # the replica step's LossScaling (every replica builds the same one)
    if mixing.describe(cfg.train):
        log.info("%s", mixing.describe(cfg.train))

    def replica_step(images, labels):
        # labels: what the train top-1 counts, the dominant label of each image when the batch is mixed.
        images, targets, labels = mixing.training_batch(images, labels, spec.model.num_classes, cfg.train, cfg.seed,
                                                        global_step, spec.placement)
        logits, _ = build_efficientnet(images, spec.model, is_training=True, freeze_bn=cfg.train.freeze_bn,
                                       xla_swish_grad=device.xla_swish_grad)
        class_weights = tf.constant(spec.class_weights, tf.float32) if spec.class_weights else None
        loss = soft_cross_entropy(logits, targets, cfg.train.label_smoothing, class_weights)
        variables = trained_variables(spec.model.name, cfg.train.freeze_backbone)
        if cfg.train.weight_decay:
            loss = tf.add(loss, weight_decay_loss(variables, cfg.train.weight_decay), name="total_loss")
        learning_rate = schedule.tensor(global_step)
        optimizer, scaling = device.wrap_optimizer(build_optimizer(cfg.optimizer, learning_rate))
        scalings.append(scaling)
        # Under tf.distribute apply_gradients sums the replicas' gradients, so each replica's loss counts 1 / count.
        grads_and_vars = optimizer.compute_gradients(loss / replicas.count if replicas.count > 1 else loss,
                                                     var_list=variables)
        grads_and_vars = clip_gradients(grads_and_vars, cfg.train.clip_grad_norm, replicas.count)
        with tf.control_dependencies(tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)):
            train_op = _update(optimizer, scaling, replicas, grads_and_vars, loss, global_step,
                               cfg.train.nonfinite_policy)
        monitors = {"lr": learning_rate}
        if scaling is not None:
            monitors.update(scaling.monitors(train_op))
        return {"train_op": train_op, "loss": loss, "top1": top_k_accuracy(logits, labels, 1), "lr": learning_rate,
                "extra": monitors}

    outputs = replicas.run(replica_step, inputs)
    train_op, average = outputs["train_op"], None
    if cfg.train.ema_decay:
        # Once per step after the replicas' update (the cross-replica context under a strategy).
        average = WeightsAverage(cfg.train.ema_decay, global_step, model_variables(spec.model.name))
        train_op = average.after(train_op)
    loop = device.device_loop(train_op)
    scaling = scalings[0]
    return TrainStep(train_op=loop.train_op, loss=outputs["loss"], top1=outputs["top1"], monitors=outputs["extra"],
                     schedule=schedule, steps_per_run=loop.iterations, average=average,
                     broadcast=device.broadcast_op(), loop=loop,
                     overflow_counter=scaling.counter.variable if scaling is not None else None)


def _update(optimizer, scaling, replicas, grads_and_vars, loss, global_step, policy):
    """The update op; a step whose update is skipped (loss-scale overflow, or a non-finite loss under
    train.nonfinite_policy=skip) still counts."""
    if scaling is not None:
        return scaling.apply_gradients(grads_and_vars, global_step)
    if policy == NonFinitePolicy.skip:
        grads = [g for g, _ in grads_and_vars if g is not None]
        finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(loss)),
                                tf.math.is_finite(tf.linalg.global_norm(grads)))
        return replicas.apply_if_finite(optimizer, grads_and_vars, finite, global_step)
    return optimizer.apply_gradients(grads_and_vars, global_step=global_step)
