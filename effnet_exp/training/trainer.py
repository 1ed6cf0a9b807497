"""The training loop: one graph, one session, one sess.run per step."""
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf

from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.errors import UserError
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.restore import HEAD_SCOPE, WeightsPlan, model_variables
from effnet_exp.run_files import CHECKPOINT_DIR, CHECKPOINT_PREFIX, append_jsonl, drop_records_after
from effnet_exp.training.checkpoints import BestCheckpoint, latest_in, save_checkpoint
from effnet_exp.training.optimizers import StepWatch, build_optimizer
from effnet_exp.training.signals import StopRequests
from effnet_exp.training.summaries import write_scalars

log = logging.getLogger(__name__)

class NonFiniteLoss(UserError):
    pass


def cross_entropy_loss(logits, labels, num_classes, label_smoothing=0.0):
    onehot = tf.one_hot(labels, num_classes)
    return tf.compat.v1.losses.softmax_cross_entropy(onehot, logits, label_smoothing=label_smoothing)


def top_k_accuracy(logits, labels, k):
    hits = tf.compat.v1.nn.in_top_k(predictions=tf.cast(logits, tf.float32), targets=labels,
                                    k=min(k, int(logits.shape[-1])))
    return tf.reduce_mean(tf.cast(hits, tf.float32))


def total_train_steps(train_cfg, num_train_images):
    if train_cfg.steps is not None:
        return int(train_cfg.steps)
    return int(math.ceil(train_cfg.epochs * num_train_images / float(train_cfg.batch_size)))


class Trainer(object):
    """Builds the training graph from the run config and runs it, writing into run_dir.

    evaluate: optional callable(checkpoint prefix) -> eval result dict, for train.eval_every.
    """

    def __init__(self, cfg, source, run_dir, session_config, image_size, pretrained=None, evaluate=None):
        from effnet_exp.devices.ascend_env import is_chief
        from effnet_exp.devices.strategy import chief_run_dir

        self.cfg = cfg
        self.pretrained = pretrained
        self.evaluate = evaluate
        self.source = source
        self.run_dir = run_dir
        self.session_config = session_config
        self.image_size = image_size
        self.chief = is_chief(cfg.device)  # writes checkpoints and summaries: Ascend rank 0, multi_worker chief
        # A multi_worker task other than the chief resumes from the chief's checkpoints (and writes none).
        self.checkpoint_dir = os.path.join(chief_run_dir(run_dir, cfg.device), CHECKPOINT_DIR)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_train_steps(cfg.train, source.num_train)

    def build_step(self, images, labels, global_step):
        """Forward, loss and update for one batch; the unit device.strategy replicates (devices/strategy.py)."""
        from effnet_exp.devices.ascend_env import data_parallel
        from effnet_exp.devices.loss_scaling import wrap_optimizer
        from effnet_exp.training.regularization import WeightsAverage, clip_gradients, weight_decay_loss
        from effnet_exp.training.schedules import learning_rate as scheduled_learning_rate

        cfg = self.cfg
        parallel = data_parallel(cfg.device)  # Ascend: RANK_SIZE processes, one device each
        logits, _ = build_efficientnet(images, cfg.model, is_training=True, freeze_bn=cfg.train.freeze_bn,
                                       xla_swish_grad=bool(getattr(cfg.device, "xla_swish_grad", False)))
        loss = cross_entropy_loss(logits, labels, cfg.model.num_classes, cfg.train.label_smoothing)
        variables = self.trained_variables()
        if cfg.train.weight_decay:
            loss = tf.add(loss, weight_decay_loss(variables, cfg.train.weight_decay), name="total_loss")
        if parallel.size > 1:  # an epoch is one pass over the data by all ranks together, each on its shard
            self.total_steps = total_train_steps(cfg.train, self.source.num_train / float(parallel.size))
        global_batch = cfg.train.batch_size * parallel.size
        learning_rate, self.schedule = scheduled_learning_rate(
            cfg.optimizer, global_step, global_batch, self.source.num_train / float(global_batch), self.total_steps)
        if not tf.distribute.has_strategy():  # under device.strategy the batch is already global (strategy.py logs)
            log.info("global batch %d (%d per process x %d); %s", global_batch, cfg.train.batch_size, parallel.size,
                     self.schedule.describe())
        optimizer, scaling = wrap_optimizer(build_optimizer(cfg.optimizer, learning_rate), cfg.device, parallel)
        # device.strategy: apply_gradients sums the replicas' gradients, so each replica's loss counts 1 / replicas.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        grads_and_vars = optimizer.compute_gradients(loss / replicas if replicas > 1 else loss, var_list=variables)
        grads_and_vars = clip_gradients(grads_and_vars, cfg.train.clip_grad_norm, replicas)
        update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(update_ops):
            if scaling is not None:  # overflow steps are skipped (and counted) by the loss-scale optimizer
                train_op = scaling.apply_gradients(grads_and_vars, global_step)
            elif cfg.train.nonfinite_policy == "skip":
                train_op = self._apply_if_finite(optimizer, grads_and_vars, loss, global_step)
            else:
                train_op = optimizer.apply_gradients(grads_and_vars, global_step=global_step)
        self.weights_average = None
        if cfg.train.ema_decay and not tf.distribute.has_strategy():  # (under a strategy: _average_weights_after)
            self.weights_average = WeightsAverage(cfg.train.ema_decay, global_step, model_variables(cfg.model.name))
            train_op = self.weights_average.after(train_op)
        extra = {"lr": learning_rate}
        if scaling is not None:
            extra.update(scaling.monitors(train_op))
        self._device_graph(train_op, parallel, scaling)
        return {"train_op": self.device_loop.train_op, "loss": loss, "top1": top_k_accuracy(logits, labels, 1),
                "lr": learning_rate, "extra": extra}

    def _device_graph(self, train_op, parallel, scaling):
        """The device loop (device.iterations_per_loop), the rank-0 broadcast and the loop's StepWatch."""
        from effnet_exp.devices.npu_graph import DeviceLoop, broadcast_variables_op

        self.parallel = parallel
        self.device_loop = DeviceLoop(train_op, getattr(self.cfg.device, "iterations_per_loop", 1))
        self.steps_per_run = self.device_loop.iterations
        self.broadcast_op = broadcast_variables_op(0) if parallel.size > 1 else None
        self.overflow_counter = scaling.counter.variable if scaling is not None else None
        self.step_watch = StepWatch(self.cfg.train.max_nonfinite_steps)

    def _sync_after_restore(self, sess, resumed):
        """After init or restore: moving averages start at the restored weights (unless resumed with their own),
        every rank takes rank 0's variables, the device loop is loaded, the overflow count is read."""
        if self.weights_average is not None and not resumed:
            sess.run(self.weights_average.reset_op)
        if self.broadcast_op is not None:
            sess.run(self.broadcast_op)
            log.info("rank %d of %d: variables broadcast from rank 0", self.parallel.rank, self.parallel.size)
        self.device_loop.load(sess)
        if self.overflow_counter is not None:
            self.step_watch.overflow_steps = int(sess.run(self.overflow_counter))

    @staticmethod
    def _apply_if_finite(optimizer, grads_and_vars, loss, global_step):
        """The update only when loss and gradients are finite; the step counts either way."""
        grads = [g for g, _ in grads_and_vars if g is not None]
        finite = tf.logical_and(tf.reduce_all(tf.math.is_finite(loss)),
                                tf.math.is_finite(tf.linalg.global_norm(grads)))
        if tf.distribute.has_strategy():
            from effnet_exp.devices.strategy import apply_if_all_finite

            return apply_if_all_finite(optimizer, grads_and_vars, finite, global_step)

        def apply():
            return optimizer.apply_gradients(grads_and_vars, global_step=global_step)

        def skip():
            return tf.group(tf.compat.v1.assign_add(global_step, 1))

        return tf.cond(finite, apply, skip)

    def trained_variables(self):
        variables = tf.compat.v1.trainable_variables()
        if self.cfg.train.freeze_backbone:
            head = self.cfg.model.name + "/" + HEAD_SCOPE
            variables = [v for v in variables if v.op.name.startswith(head)]
        return variables

    def data_shard(self):
        """build_dataset's sharding: Ascend data parallelism reads shard RANK_ID of RANK_SIZE."""
        from effnet_exp.devices.ascend_env import data_parallel

        parallel = data_parallel(self.cfg.device)
        if parallel.size > 1:
            log.info("rank %d of %d reads shard %d of %d of the training files", parallel.rank, parallel.size,
                     parallel.rank, parallel.size)
        return {"num_shards": parallel.size, "shard_index": parallel.rank}

    def _summary_writer(self, graph):
        """TensorBoard's writer on rank 0; the other ranks of a data-parallel job write no summaries."""
        if not self.chief:
            return _NoSummaries()
        # Created in the graph's context: on TF 2.x, FileWriter refuses to work eagerly.
        return tf.compat.v1.summary.FileWriter(os.path.join(self.run_dir, "tensorboard", "train"), graph)

    def train(self):
        """Runs to train.steps (or train.epochs); returns the last metrics with the final checkpoint prefix."""
        from effnet_exp.devices.strategy import make_replicas

        cfg = self.cfg
        graph = tf.Graph()
        with graph.as_default():
            replicas = make_replicas(cfg.device)  # device.strategy (tf.distribute), else a single device
        with graph.as_default(), replicas.scope():
            tf.compat.v1.set_random_seed(cfg.seed)
            # A resumed run carries on with the records right after the ones its checkpoint has seen (under a
            # strategy too: train.batch_size is then the global batch, and every worker reads the global stream).
            start_position = self._checkpointed_step() * cfg.train.batch_size

            def dataset():  # global batches; under a strategy each replica takes its slice of every one
                return build_dataset(self.source, cfg.dataset, is_training=True, batch_size=cfg.train.batch_size,
                                     image_size=self.image_size, normalization=cfg.dataset.normalization,
                                     seed=cfg.seed, start_position=start_position, **self.data_shard())

            iterator_init, inputs = replicas.input_iterator(dataset, cfg.train.batch_size)
            global_step = tf.compat.v1.train.get_or_create_global_step()
            step_ops = replicas.run(self.build_step, inputs, global_step)
            if tf.distribute.has_strategy():
                step_ops["train_op"] = self._average_weights_after(step_ops["train_op"], global_step)
            replicas.watch_copies()
            replicas.log_layout(cfg.train, cfg.optimizer, self.schedule)
            saver = tf.compat.v1.train.Saver(max_to_keep=cfg.train.keep_checkpoint_max,
                                             save_relative_paths=True)
            initial_weights = self._initial_weights()
            init = tf.compat.v1.global_variables_initializer()
            writer = self._summary_writer(graph)
            graph.finalize()
            try:
                with replicas.session(graph, self.session_config) as sess:
                    step = self._init_or_resume(sess, saver, init, global_step, initial_weights)
                    sess.run(iterator_init)
                    with StopRequests() as stop, data_errors(cfg.dataset):
                        result = _Loop(self, sess, saver, writer, step_ops, stop).run(step)
                    replicas.report_copies(sess, result["step"])  # under a strategy: do the replicas agree?
                    if skipped_records(graph):
                        log.warning("skipped %d bad record(s) while training", skipped_records(graph))
                    return result
            finally:
                writer.close()

    def _average_weights_after(self, train_op, global_step):
        """Under a strategy the moving averages are updated once per step, after the replicas' update, in the
        cross-replica context (mirrored shadows, one update of every copy); build_step does it otherwise."""
        from effnet_exp.training.regularization import WeightsAverage

        if not self.cfg.train.ema_decay:
            return train_op
        self.weights_average = WeightsAverage(self.cfg.train.ema_decay, global_step,
                                              model_variables(self.cfg.model.name))
        return self.weights_average.after(train_op)

    def _checkpointed_step(self):
        """The global step of the run folder's latest checkpoint (0 without one), read before the graph exists."""
        latest = latest_in(self.checkpoint_dir)
        if not latest:
            return 0
        step = int(tf.train.load_variable(latest, "global_step"))
        log.info("input stream resumes after %d batches of %d", step, self.cfg.train.batch_size)
        return step

    def _initial_weights(self):
        """(plan, saver) for model.pretrained, unless the run folder has checkpoints of its own (they win)."""
        if not self.pretrained or latest_in(self.checkpoint_dir):
            return None
        scope = self.cfg.model.name
        plan = WeightsPlan(self.pretrained, model_variables(scope), scope, self.cfg.model.pretrained_weights,
                           allow_new_head=True)
        return plan, plan.saver()

    def _init_or_resume(self, sess, saver, init, global_step, initial_weights):
        sess.run(init)
        resume_from = latest_in(self.checkpoint_dir)
        if resume_from:
            saver.restore(sess, resume_from)
            log.info("resumed from %s", resume_from)
        elif initial_weights:
            plan, pretrained_saver = initial_weights
            pretrained_saver.restore(sess, plan.prefix)
            log.info("initialised from pretrained weights: %s", plan.describe())
        self._sync_after_restore(sess, resumed=bool(resume_from))
        return int(sess.run(global_step))


class _NoSummaries(object):
    """The summary writer of a rank other than 0."""

    def add_summary(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class _Loop(object):
    """The step loop's state: metrics since the last log line, checkpoint times, the NaN streak."""

    def __init__(self, trainer, sess, saver, writer, step_ops, stop):
        self.trainer = trainer
        self.cfg = trainer.cfg.train
        self.sess = sess
        self.saver = saver
        self.writer = writer
        self.fetches = [step_ops["train_op"], step_ops["loss"], step_ops["top1"], step_ops.get("extra", {})]
        self.stop = stop
        self.prefix = os.path.join(trainer.checkpoint_dir, CHECKPOINT_PREFIX)
        self.checkpoint = latest_in(trainer.checkpoint_dir)
        self.best = BestCheckpoint(trainer.checkpoint_dir)
        self.losses, self.top1s = [], []
        self.nonfinite_streak = 0
        self.last = {}
        self.last_eval = None

    def run(self, step):
        trainer, cfg = self.trainer, self.cfg
        total = trainer.total_steps
        log.info("training %s for %d steps of batch %d (%d images per epoch), from step %d",
                 trainer.cfg.model.name, total, cfg.batch_size, trainer.source.num_train, step)
        self.started = self.interval_start = self.saved_time = time.time()
        self.start_step = step
        if trainer.chief:
            dropped = drop_records_after(trainer.metrics_path, step)
            if dropped:
                log.info("dropped %d metrics record(s) after step %d: those steps run again", dropped, step)
        self.last = {"step": step}
        while step < total:
            _, loss, top1, extra = self.sess.run(self.fetches)
            step += trainer.steps_per_run  # device.iterations_per_loop steps per sess.run on Ascend, else 1
            if not trainer.step_watch.skipped(step, loss, extra):  # a loss-scale overflow is no NaN fault
                self._check_finite(step, loss)
            self.losses.append(loss)
            self.top1s.append(top1)
            if step % cfg.log_every == 0 or step == total:
                self._log(step)
            if self._checkpoint_due(step):
                self._save(step)
            if cfg.eval_every and trainer.evaluate and step % cfg.eval_every == 0:
                self._evaluate(step)
            if self.stop.requested:
                self._stop(step)
        if self.checkpoint is None or not self.checkpoint.endswith("-%d" % step):
            self._save(step)
        self.last["checkpoint"] = self.checkpoint
        if self.last_eval and self.last_eval["checkpoint"] == os.path.abspath(self.checkpoint):
            self.last["eval"] = self.last_eval  # the final checkpoint is already evaluated
        return self.last

    def _check_finite(self, step, loss):
        if np.isfinite(loss):
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        kept = "the last good checkpoint, {}, is kept".format(self.checkpoint) if self.checkpoint else \
            "no checkpoint had been written yet"
        if self.cfg.nonfinite_policy == "skip":
            log.warning("step %d: loss is %s, update skipped (%d in a row)", step, loss, self.nonfinite_streak)
            if self.nonfinite_streak < self.cfg.max_nonfinite_steps:
                return
            raise NonFiniteLoss("loss was not finite for {} steps in a row, up to step {}; {}".format(
                self.nonfinite_streak, step, kept))
        raise NonFiniteLoss("loss became {} at step {}; {} (lower optimizer.lr, or set "
                            "train.nonfinite_policy=skip)".format(loss, step, kept))

    def _log(self, step):
        trainer, cfg = self.trainer, self.cfg
        now = time.time()
        losses = [l for l in self.losses if np.isfinite(l)]
        last = {"step": step, "loss": float(np.mean(losses)) if losses else None,
                "top1": float(np.mean(self.top1s)), "lr": float(trainer.step_watch.lr),
                "images_per_sec": len(self.top1s) * cfg.batch_size / max(now - self.interval_start, 1e-9),
                "epoch": step * cfg.batch_size / float(trainer.source.num_train),
                "elapsed_sec": now - self.started}
        self.last = last
        self._write_metrics(last)
        write_scalars(self.writer, step, {k: last[k] for k in ("loss", "top1", "lr", "images_per_sec")
                                          if last[k] is not None})
        eta = (trainer.total_steps - step) * (now - self.started) / (step - self.start_step)
        log.info("step %d/%d loss %s top1 %.3f lr %.3g %.1f img/s eta %.0fs", step, trainer.total_steps,
                 "%.4f" % last["loss"] if last["loss"] is not None else "nan", last["top1"], last["lr"],
                 last["images_per_sec"], eta)
        self.losses, self.top1s = [], []
        self.interval_start = time.time()

    def _write_metrics(self, record):
        try:
            append_jsonl(self.trainer.metrics_path, record)
        except (IOError, OSError) as err:
            raise UserError("cannot write {}: {}".format(self.trainer.metrics_path, err.strerror or err))

    def _checkpoint_due(self, step):
        cfg = self.cfg
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            return True
        minutes = cfg.checkpoint_every_minutes
        return bool(minutes) and time.time() - self.saved_time >= 60.0 * minutes

    def _save(self, step):
        if not self.trainer.chief:
            return  # only rank 0 / the chief writes checkpoints
        self.checkpoint = save_checkpoint(self.saver, self.sess, self.prefix, step, self.checkpoint)
        self.saved_time = time.time()

    def _evaluate(self, step):
        if self.checkpoint is None or not self.checkpoint.endswith("-%d" % step):
            self._save(step)
        result = self.trainer.evaluate(self.checkpoint)
        self.last_eval = result
        record = {"step": step, "eval_top1": result["top1"], "eval_top5": result["top5"]}
        is_best = self.best.offer(self.checkpoint, step, result["top1"])
        record["best_eval_top1"] = self.best.top1
        self._write_metrics(record)
        write_scalars(self.writer, step, {"eval_top1": result["top1"]})
        log.info("step %d eval top1 %.4f top5 %.4f%s", step, result["top1"], result["top5"],
                 " (best so far, kept in checkpoints/best)" if is_best else "")
        from effnet_exp.reporting.curves import update_curves
        update_curves(self.trainer.run_dir)  # curves.png with this evaluation

    def _stop(self, step):
        if self.losses:
            self._log(step)
        if self.checkpoint is None or not self.checkpoint.endswith("-%d" % step):
            self._save(step)
        raise self.stop.error(step, self.checkpoint)
