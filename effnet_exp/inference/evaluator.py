"""Top-1 / top-5 over the whole validation set, every image exactly once; writes eval.json."""
import logging
import os
import time

import tensorflow as tf

from effnet_exp import interrupts, run_folder
from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.data.source import files_text
from effnet_exp.devices.base import Purpose
from effnet_exp.errors import UserError
from effnet_exp.model.restore import InferenceModel
from effnet_exp.training.checkpoints import checkpoint_step
from effnet_exp.training.metrics import cross_entropy, top_k_hits
from effnet_exp.training.summaries import write_scalars

log = logging.getLogger(__name__)


class Evaluator(object):
    def __init__(self, spec):
        self.spec = spec

    def _build(self, checkpoint):
        spec, cfg = self.spec, self.spec.cfg
        dataset = build_dataset(spec.source, cfg.dataset, is_training=False, batch_size=cfg.eval.batch_size,
                                image_size=spec.image_size, normalization=spec.normalization)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        images, labels = iterator.get_next()
        model = InferenceModel(images, spec.model, checkpoint, spec.use_ema)
        logits = model.logits
        losses = cross_entropy(logits, labels, spec.model.num_classes, per_image=True)

        def hits(k):
            return tf.reduce_sum(tf.cast(top_k_hits(logits, labels, k), tf.int64))

        counts = {"top1": hits(1), "top5": hits(5), "num_images": tf.size(labels, out_type=tf.int64),
                  "loss_sum": tf.reduce_sum(tf.cast(losses, tf.float64))}
        return iterator, counts, model

    def evaluate(self, checkpoint, note=None):
        """Top-1 / top-5 of checkpoint, written to eval.json with note's keys (what this evaluation is) added."""
        graph = tf.Graph()
        interrupts.fault_point("building")
        with graph.as_default():
            iterator, count_ops, model = self._build(checkpoint)
        graph.finalize()
        totals = {k: 0 for k in count_ops}
        started = time.time()
        with tf.compat.v1.Session(graph=graph, config=self.spec.device.session_config(Purpose.INFERENCE)) as sess:
            interrupts.fault_point("restoring")
            model.restore(sess)
            sess.run(iterator.initializer)
            with data_errors(self.spec.cfg.dataset):
                while True:
                    interrupts.check()  # an evaluation during training runs where signals are deferred
                    try:
                        values = sess.run(count_ops)
                    except tf.errors.OutOfRangeError:
                        break
                    for k, v in values.items():
                        totals[k] += v
                    interrupts.fault_point("evaluating")
        result = self._result(checkpoint, totals, skipped_records(graph), model.plan, time.time() - started)
        result.update(note or {})
        self._write(result)
        log.info("eval of %s (%s weights): top1 %.4f top5 %.4f over %d images", checkpoint, result["weights"],
                 result["top1"], result["top5"], result["num_images"])
        return result

    def _result(self, checkpoint, totals, skipped, plan, seconds):
        spec = self.spec
        if skipped:
            log.warning("skipped %d bad record(s) of the validation set (dataset.skip_bad_records)", skipped)
        n = int(totals["num_images"])
        if n == 0:
            why = "all {} record(s) were bad and skipped (dataset.skip_bad_records)".format(skipped) if skipped \
                else "they hold no records"
            raise UserError("no validation images to evaluate in {} ({}): {}".format(
                spec.source.data_dir, files_text(spec.source.eval_files), why))
        if spec.source.num_eval and spec.source.num_eval != n + skipped:
            log.warning("evaluated %d images but the dataset is said to hold %d", n, spec.source.num_eval)
        return {"top1": totals["top1"] / float(n), "top5": totals["top5"] / float(n),
                "loss": float(totals["loss_sum"]) / n, "num_images": n, "checkpoint": os.path.abspath(checkpoint),
                "step": checkpoint_step(checkpoint), "model": spec.model.name, "image_size": spec.image_size,
                "images_per_sec": n / max(seconds, 1e-9), "skipped_records": skipped,
                "weights": "ema" if plan.uses_ema else "raw"}

    def _write(self, result):
        run_dir = self.spec.run_dir
        run_folder.atomic_write_json(run_folder.eval_path(run_dir), result)
        with tf.Graph().as_default():
            writer = tf.compat.v1.summary.FileWriter(run_folder.tensorboard_dir(run_dir, "eval"))
            try:
                write_scalars(writer, result["step"] or 0, {k: result[k] for k in ("top1", "top5", "loss")})
            finally:
                writer.close()
