"""The training loop: one graph, one session, one sess.run per device loop (usually one step)."""
import logging
import os
import time

import numpy as np
import tensorflow as tf

from effnet_exp import interrupts, run_folder
from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.devices.base import Purpose
from effnet_exp.errors import UserError
from effnet_exp.model.restore import WeightsPlan, model_variables
from effnet_exp.reporting.curves import update_curves
from effnet_exp.training import progressive
from effnet_exp.training.checkpoints import BestCheckpoint, keep_rotating, save_checkpoint
from effnet_exp.training.config import NonFinitePolicy
from effnet_exp.training.early_stopping import ChiefEvaluations, EarlyStopping, best_record
from effnet_exp.training.step import build_train_step
from effnet_exp.training.summaries import NoSummaries, write_scalars

log = logging.getLogger(__name__)

# How often another process than the chief looks for the chief's checkpoint at a stage boundary.
CHECKPOINT_POLL_SECONDS = 0.5


class NonFiniteLoss(UserError):
    pass


class Trainer(object):
    """Trains spec's model; evaluate: optional callable(checkpoint prefix) -> eval result, for train.eval_every
    (the chief's only)."""

    def __init__(self, spec, evaluate=None):
        self.spec = spec
        self.evaluate = evaluate

    def train(self):
        """Runs to the step total or an early stop; returns the last metrics with the final checkpoint prefix (and
        "early_stop": the stop's metrics record)."""
        spec = self.spec
        stopping = self._early_stopping()
        if stopping.stopped:
            return self._stopped_already(stopping)
        plan = progressive.plan(spec.cfg, spec.image_size, spec.total_steps, spec.device.steps_per_run)
        if plan is None:
            return self._train(spec, stopping)
        return self._train_stages(progressive.stages(plan), stopping)

    def _train_stages(self, stages, stopping):
        """train.progressive: one graph per stage, each restored from the checkpoint the stage before it saved at the
        boundary (weights, batch-norm statistics, optimizer slots, EMA, the global step); a resumed run starts in
        the stage of its checkpoint's step."""
        spec = self.spec
        checkpoint, step, last_eval, result = spec.resume_checkpoint, spec.resume_step, None, None
        for stage in stages[progressive.stage_at(stages, step).index - 1:]:
            self._announce(stage)
            stage_spec = progressive.stage_spec(spec, stage, checkpoint, step)
            result = self._train(stage_spec, stopping, stage.last_step, last_eval)
            if result.get("early_stop"):
                break
            step, last_eval = result["step"], result.get("last_eval")
            checkpoint = result["checkpoint"] if spec.placement.chief else self._chief_checkpoint(step)
        return result

    def _announce(self, stage):
        """The stage's log line, and its metrics.jsonl record unless a run stopped in this stage wrote it."""
        log.info("%s", stage.describe())
        path = run_folder.metrics_path(self.spec.own_dir)
        if not any(r.get("stage") == stage.index for r in run_folder.read_metrics(path)):
            _append_metrics(path, stage.record())

    def _chief_checkpoint(self, step):
        """Another process than the chief starts the next stage from the chief's checkpoint of the boundary step."""
        folder = run_folder.checkpoint_dir(self.spec.run_dir)
        suffix = "-%d" % step
        while not (run_folder.latest_checkpoint(folder) or "").endswith(suffix):
            time.sleep(CHECKPOINT_POLL_SECONDS)  # a signal raises Interrupted here
        return run_folder.latest_checkpoint(folder)

    def _train(self, spec, stopping, stop_at=None, last_eval=None):
        """Builds spec's graph and trains it from spec's resume step up to stop_at (default: the step total)."""
        cfg = spec.cfg
        graph = tf.Graph()
        interrupts.fault_point("building")
        with graph.as_default():
            replicas = spec.device.replicas()
        with graph.as_default(), replicas.scope():
            tf.compat.v1.set_random_seed(cfg.seed)
            iterator_init, inputs = replicas.input_iterator(lambda: self._dataset(spec), cfg.train.batch_size)
            global_step = tf.compat.v1.train.get_or_create_global_step()
            step = build_train_step(spec, replicas, inputs, global_step)
            replicas.watch_copies()
            saver = tf.compat.v1.train.Saver(max_to_keep=cfg.train.keep_checkpoint_max, save_relative_paths=True)
            keep_rotating(saver, run_folder.checkpoint_dir(spec.run_dir))
            initial = self._initial_weights(spec)
            init = tf.compat.v1.global_variables_initializer()
            writer = self._summary_writer(graph)
            graph.finalize()
        log.info("; ".join(filter(None, [spec.placement.describe(cfg.train.batch_size), replicas.describe(),
                                         step.schedule.describe()])))
        try:
            with replicas.session(graph, spec.device.session_config(Purpose.TRAIN)) as sess:
                sess.run(init)
                self._restore(spec, sess, saver, initial)
                overflow_steps = step.initialize(sess, resumed=bool(spec.resume_checkpoint))
                sess.run(iterator_init)
                # A signal is taken between steps, so that the checkpoint it leaves is of a whole step.
                with interrupts.deferred(), data_errors(cfg.dataset):
                    loop = _Loop(self, spec, sess, saver, writer, step, overflow_steps, stopping)
                    loop.last_eval = last_eval
                    result = loop.run(int(sess.run(global_step)), stop_at or spec.total_steps)
                replicas.report_copies(sess, result["step"])  # under a strategy: do the replicas agree?
                if skipped_records(graph):
                    log.warning("skipped %d bad record(s) while training", skipped_records(graph))
                return result
        finally:
            writer.close()

    def _early_stopping(self):
        """train.early_stopping's state at the start: the chief's evaluations up to the step resumed from."""
        stopping = EarlyStopping(self.spec.cfg.train.early_stopping)
        if not stopping.enabled:
            return stopping
        records = run_folder.read_metrics(run_folder.metrics_path(self.spec.run_dir))
        return stopping.replay(records, self.spec.resume_step)

    def _stopped_already(self, stopping):
        """A resumed run whose evaluations already meet the early-stopping rule trains no further."""
        spec = self.spec
        record = stopping.record(spec.resume_step, best_record(spec.run_dir))
        log.info("this run already stopped early at step %d: %s; nothing more to train (resume with a larger "
                 "train.early_stopping.patience, or 0, to train on)", spec.resume_step, record["reason"])
        return {"step": spec.resume_step, "checkpoint": spec.resume_checkpoint, "early_stop": record}

    @staticmethod
    def _dataset(spec):
        """This process's input stream, resumed right after the records its checkpoint has seen."""
        cfg = spec.cfg
        placement = spec.placement
        batch = placement.stream_batch(cfg.train.batch_size)
        return build_dataset(spec.source, cfg.dataset, is_training=True, batch_size=batch,
                             image_size=spec.image_size, normalization=spec.normalization, seed=cfg.seed,
                             start_position=spec.resume_step * batch, num_shards=placement.input_shards,
                             shard_index=placement.input_shard)

    @staticmethod
    def _initial_weights(spec):
        """(plan, saver) for model.pretrained, unless the run folder has checkpoints of its own (they win)."""
        if not spec.initial_weights or spec.resume_checkpoint:
            return None
        scope = spec.model.name
        plan = WeightsPlan(spec.initial_weights, model_variables(scope), scope, "ema" if spec.use_ema else "raw",
                           allow_new_head=True)
        return plan, plan.saver()

    @staticmethod
    def _restore(spec, sess, saver, initial):
        interrupts.fault_point("restoring")
        if spec.resume_checkpoint:
            saver.restore(sess, spec.resume_checkpoint)
            log.info("resumed from %s", spec.resume_checkpoint)
        elif initial:
            plan, pretrained_saver = initial
            pretrained_saver.restore(sess, plan.prefix)
            log.info("initialised from pretrained weights: %s", plan.describe())

    def _summary_writer(self, graph):
        """TensorBoard's writer on the chief; the other processes of a data-parallel job write no summaries."""
        if not self.spec.placement.chief:
            return NoSummaries()
        # Created in the graph's context: on TF 2.x, FileWriter refuses to work eagerly.
        return tf.compat.v1.summary.FileWriter(run_folder.tensorboard_dir(self.spec.run_dir, "train"), graph)


def _append_metrics(path, record):
    try:
        run_folder.append_jsonl(path, record)
    except (IOError, OSError) as err:
        raise UserError("cannot write {}: {}".format(path, err.strerror or err))


class NonFiniteWatch(object):
    """The one streak of non-finite losses, and the loss-scale overflow count.

    A non-finite loss stops the run at once, unless its update was skipped (train.nonfinite_policy=skip, or a
    loss-scale overflow): then the run stops after train.max_nonfinite_steps such steps in a row."""

    def __init__(self, train_cfg, overflow_steps):
        self.policy = train_cfg.nonfinite_policy
        self.max_steps = train_cfg.max_nonfinite_steps
        self.overflow_steps = overflow_steps
        self.streak = 0

    def note(self, step, loss, monitors, checkpoint):
        overflowed = self._overflowed(step, monitors)
        if np.all(np.isfinite(loss)):
            self.streak = 0
            return
        self.streak += 1
        kept = "the last good checkpoint, {}, is kept".format(checkpoint) if checkpoint else \
            "no checkpoint had been written yet"
        if not overflowed and self.policy != NonFinitePolicy.skip:
            raise NonFiniteLoss("loss became {} at step {}; {} (lower optimizer.lr, or set "
                                "train.nonfinite_policy=skip)".format(loss, step, kept))
        log.warning("step %d: loss is %s, update skipped (%d in a row)", step, loss, self.streak)
        if self.streak >= self.max_steps:
            raise NonFiniteLoss("loss was not finite for {} steps in a row, up to step {}; {}".format(
                self.streak, step, kept))

    def _overflowed(self, step, monitors):
        if "overflow_steps" not in monitors:
            return False
        count = int(monitors["overflow_steps"])
        new, self.overflow_steps = count - self.overflow_steps, count
        if new > 0:
            log.info("step %d: gradient overflow, update skipped (%d overflow steps so far); loss scale now %g",
                     step, count, float(monitors["loss_scale"]))
        return new > 0


class _Loop(object):
    """The step loop's state: metrics since the last log line, checkpoint times, the non-finite watch, early
    stopping."""

    def __init__(self, trainer, spec, sess, saver, writer, step, overflow_steps, stopping):
        self.spec = spec
        self.cfg = spec.cfg.train
        self.evaluate = trainer.evaluate if spec.placement.chief else None
        self.sess = sess
        self.saver = saver
        self.writer = writer
        self.step = step
        self.watch = NonFiniteWatch(self.cfg, overflow_steps)
        self.stopping = stopping
        # The other processes do not evaluate: they take each evaluation's result from the chief's records.
        self.chief_evals = ChiefEvaluations(run_folder.metrics_path(spec.run_dir)) \
            if stopping.enabled and not spec.placement.chief else None
        self.prefix = run_folder.checkpoint_prefix(spec.run_dir)
        self.checkpoint = spec.resume_checkpoint
        self.best = BestCheckpoint(run_folder.checkpoint_dir(spec.run_dir))
        self.metrics_path = run_folder.metrics_path(spec.own_dir)
        self.losses, self.top1s = [], []
        self.lr = None
        self.last = {}
        self.last_eval = None
        self.early_stop = None

    def run(self, step, stop_at):
        """Trains from step to stop_at (the step total, or the end of a progressive stage)."""
        spec, cfg, total = self.spec, self.cfg, self.spec.total_steps
        log.info("training %s for %d steps of global batch %d (%d images per epoch), from step %d",
                 spec.model.name, total, cfg.batch_size, spec.source.num_train, step)
        self.started = self.interval_start = self.saved_time = time.time()
        self.start_step = step
        dropped = run_folder.drop_records_after(self.metrics_path, step)
        if dropped:
            log.info("dropped %d metrics record(s) after step %d: those steps run again", dropped, step)
        self.last = {"step": step}
        if self.stopping.enabled:
            log.info("early stopping: %s", self.stopping.describe())
        while step < stop_at:
            _, loss, top1, monitors = self.sess.run(self.step.fetches())
            step += self.step.steps_per_run
            interrupts.fault_point("training")
            self.watch.note(step, loss, monitors, self.checkpoint)
            self.lr = monitors["lr"]
            self.losses.append(loss)
            self.top1s.append(top1)
            if step % cfg.log_every == 0 or step == stop_at:
                self._log(step)
            if self._checkpoint_due(step):
                self._save(step)
            if self._evaluation_due(step) and self.stopping.note(self._eval_top1(step)):
                self._stop_early(step)
                break
            if interrupts.requested():
                self._stop(step)
        self._save(step)
        if interrupts.requested():
            self._stop(step)
        self.last["checkpoint"] = self.checkpoint
        self.last["last_eval"] = self.last_eval
        self.last["early_stop"] = self.early_stop
        if self.last_eval and self.last_eval["checkpoint"] == os.path.abspath(self.checkpoint):
            self.last["eval"] = self.last_eval  # the final checkpoint is already evaluated
        return self.last

    def _log(self, step):
        cfg, now = self.cfg, time.time()
        losses = [l for l in self.losses if np.isfinite(l)]
        images = len(self.top1s) * self.step.steps_per_run * cfg.batch_size
        last = {"step": step, "loss": float(np.mean(losses)) if losses else None,
                "top1": float(np.mean(self.top1s)), "lr": float(self.lr),
                "images_per_sec": images / max(now - self.interval_start, 1e-9),
                "epoch": step * cfg.batch_size / float(self.spec.source.num_train), "elapsed_sec": now - self.started}
        self.last = last
        self._write_metrics(last)
        write_scalars(self.writer, step, {k: last[k] for k in ("loss", "top1", "lr", "images_per_sec")
                                          if last[k] is not None})
        eta = (self.spec.total_steps - step) * (now - self.started) / (step - self.start_step)
        log.info("step %d/%d loss %s top1 %.3f lr %.3g %.1f img/s eta %.0fs", step, self.spec.total_steps,
                 "%.4f" % last["loss"] if last["loss"] is not None else "nan", last["top1"], last["lr"],
                 last["images_per_sec"], eta)
        self.losses, self.top1s = [], []
        self.interval_start = time.time()

    def _write_metrics(self, record):
        _append_metrics(self.metrics_path, record)

    def _checkpoint_due(self, step):
        cfg = self.cfg
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            return True
        minutes = cfg.checkpoint_every_minutes
        return bool(minutes) and time.time() - self.saved_time >= 60.0 * minutes

    def _save(self, step):
        """A checkpoint of this step, unless there is one already; only the chief writes them."""
        if not self.spec.placement.chief or (self.checkpoint and self.checkpoint.endswith("-%d" % step)):
            return
        interrupts.fault_point("saving")
        self.checkpoint = save_checkpoint(self.saver, self.sess, self.prefix, step, self.checkpoint)
        self.saved_time = time.time()

    def _evaluation_due(self, step):
        cfg = self.cfg
        return bool(cfg.eval_every) and step % cfg.eval_every == 0 and bool(self.evaluate or self.chief_evals)

    def _eval_top1(self, step):
        return self._evaluate(step)["top1"] if self.evaluate else self._chief_top1(step)

    def _chief_top1(self, step):
        """The chief's eval top-1 at this step (another process waits for it, to decide an early stop alike)."""
        top1 = self.chief_evals.wait(step, interrupts.requested)
        if top1 is None:
            self._stop(step)
        log.info("step %d eval top1 %.4f (the chief's)", step, top1)
        return top1

    def _evaluate(self, step):
        self._save(step)
        try:
            result = self.evaluate(self.checkpoint)
        except interrupts.Interrupted:
            self._stop(step)
        self.last_eval = result
        record = {"step": step, "eval_top1": result["top1"], "eval_top5": result["top5"]}
        is_best = self.best.offer(self.checkpoint, step, result["top1"])
        record["best_eval_top1"] = self.best.top1
        self._write_metrics(record)
        write_scalars(self.writer, step, {"eval_top1": result["top1"]})
        log.info("step %d eval top1 %.4f top5 %.4f%s", step, result["top1"], result["top5"],
                 " (best so far, kept in checkpoints/best)" if is_best else "")
        update_curves(self.spec.own_dir)  # curves.png with this evaluation
        return result

    def _stop_early(self, step):
        """The last checkpoint is this step's (saved for the evaluation); the record says why and which is best."""
        if self.losses:
            self._log(step)
        self._save(step)
        self.early_stop = self.stopping.record(step, best_record(self.spec.run_dir))
        self._write_metrics(self.early_stop)
        log.info("stopped early at step %d of %d: %s; the best checkpoint is step %d's (eval top1 %.4f), %s", step,
                 self.spec.total_steps, self.early_stop["reason"], self.early_stop["best_step"],
                 self.early_stop["best_eval_top1"], self.early_stop["best_checkpoint"])

    def _stop(self, step):
        if self.losses:
            self._log(step)
        self._save(step)
        signum = interrupts.requested()
        saved = "checkpoint {} saved".format(self.checkpoint) if self.spec.placement.chief else \
            "the chief process saves the checkpoints"
        raise interrupts.Interrupted(signum, "stopped by {} at step {}; {}".format(
            interrupts.signal_name(signum), step, saved))
