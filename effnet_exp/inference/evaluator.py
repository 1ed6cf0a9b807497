"""An evaluation: every validation image exactly once. Per batch the graph gives each image's label, top-5 classes
and probabilities and its true class's probability (small arrays kept in NumPy), plus the images of the few
candidates for mistakes.png; eval.json's metrics are then computed from those arrays (eval_metrics) and written
with the files beside it (eval_outputs)."""
import logging
import math
import os
import time

import tensorflow as tf

from effnet_exp import interrupts
from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.data.preprocessing import pixels
from effnet_exp.data.source import files_text
from effnet_exp.devices.base import Purpose
from effnet_exp.errors import UserError
from effnet_exp.inference.artifacts import CheckpointModel, open_model
from effnet_exp.inference.eval_metrics import TOP_K, EvalAccumulator, evaluation_metrics
from effnet_exp.inference.eval_outputs import write_outputs
from effnet_exp.inference.mistakes import ConfidentMistakes

log = logging.getLogger(__name__)


def class_log_probabilities(images, model_cfg, checkpoint, use_ema, flip_tta=False):
    """(the model, log-probabilities [B, C] of images) of a training checkpoint; see model_log_probabilities."""
    model = CheckpointModel(checkpoint, model_cfg, use_ema)
    return model, model_log_probabilities(images, model, flip_tta)


def model_log_probabilities(images, model, flip_tta=False):
    """Log-probabilities [B, C] of images by model (inference.artifacts: a checkpoint or an exported artifact).
    flip_tta: those of the mean of the softmax probabilities of each image and of its horizontal mirror (the
    batch and its mirror go through the model together)."""
    if not flip_tta:
        return model.log_probabilities(images)
    both = tf.concat([images, tf.reverse(images, axis=[2])], 0)
    own, mirrored = tf.split(model.log_probabilities(both), 2, axis=0)
    # log((p + q) / 2) in the log domain: exact where p and q underflow float32.
    return tf.reduce_logsumexp(tf.stack([own, mirrored]), axis=0) - math.log(2.0)


def _mistake_candidates(images, labels, top_index, top_probability, floor, limit):
    """(positions in the batch, images) of at most `limit` wrong images more confident than floor."""
    confidence = top_probability[:, 0]
    candidate = tf.logical_and(tf.not_equal(top_index[:, 0], labels), tf.greater(confidence, floor))
    score = tf.compat.v1.where(candidate, confidence, -tf.ones_like(confidence))
    best, positions = tf.nn.top_k(score, k=tf.minimum(limit, tf.size(score)))
    positions = tf.boolean_mask(positions, tf.greater_equal(best, 0.0))
    return positions, tf.gather(images, positions)


class _Collected(object):
    """What the evaluation keeps of each batch: the per-image arrays, the loss, the sources, the mistakes."""

    def __init__(self, mistakes, normalization):
        self.arrays = EvalAccumulator()
        self.mistakes = ConfidentMistakes(mistakes)
        self.normalization = normalization
        self.sources = []
        self.loss_sum = 0.0
        self.count = 0

    def add(self, values):
        self.arrays.add(values["labels"], values["top_index"], values["top_probability"],
                        values["label_probability"])
        self.loss_sum += float(values["loss_sum"])
        self.sources.extend(s.decode("utf-8", "replace") for s in values.get("sources", ()))
        if "mistakes" in values:
            positions = values["mistakes"]
            self.mistakes.add(self.count + positions, values["top_probability"][positions, 0],
                              pixels(values["mistake_images"], self.normalization))
        self.count += len(values["labels"])


def _class_names(spec):
    """The names in eval.json, confusion.csv and the figures: the run's class names, else the indices."""
    num_classes = spec.model.num_classes
    if spec.class_names and len(spec.class_names) == num_classes:
        return list(spec.class_names)
    return [str(index) for index in range(num_classes)]


class Evaluator(object):
    def __init__(self, spec):
        self.spec = spec
        self.class_names = _class_names(spec)
        if spec.cfg.eval.flip_tta:
            log.info("eval.flip_tta=true: each eval image's probabilities are the mean of its own and its "
                     "horizontal mirror's (twice the model's work)")

    def _build(self, checkpoint):
        spec, cfg = self.spec, self.spec.cfg
        dataset = build_dataset(spec.source, cfg.dataset, is_training=False, batch_size=cfg.eval.batch_size,
                                image_size=spec.image_size, normalization=spec.normalization,
                                with_sources=cfg.eval.save_predictions)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        images, labels = batch[0], batch[1]
        model = open_model(checkpoint, spec.model, spec.use_ema, cfg.device.intra_op_threads)
        log_p = model_log_probabilities(images, model, cfg.eval.flip_tta)
        num_classes = spec.model.num_classes
        top_probability, top_index = tf.nn.top_k(tf.exp(log_p), k=min(TOP_K, num_classes))
        log_p_true = tf.reduce_sum(log_p * tf.one_hot(labels, num_classes), axis=1)
        fetches = {"labels": labels, "top_index": top_index, "top_probability": top_probability,
                   "label_probability": tf.exp(log_p_true),
                   "loss_sum": tf.reduce_sum(tf.cast(-log_p_true, tf.float64))}
        if cfg.eval.save_predictions:
            fetches["sources"] = batch[2]
        floor = tf.compat.v1.placeholder_with_default(tf.constant(-1.0), [])
        if cfg.eval.mistakes:
            fetches["mistakes"], fetches["mistake_images"] = _mistake_candidates(
                images, labels, top_index, top_probability, floor, cfg.eval.mistakes)
        return iterator, fetches, floor, model

    def evaluate(self, checkpoint, note=None):
        """Evaluates checkpoint; writes eval.json (with note's keys: what this evaluation is) and the files beside
        it; returns eval.json's fields."""
        graph = tf.Graph()
        interrupts.fault_point("building")
        with graph.as_default():
            iterator, fetches, floor, model = self._build(checkpoint)
        graph.finalize()
        collected = _Collected(self.spec.cfg.eval.mistakes, self.spec.normalization)
        started = time.time()
        with tf.compat.v1.Session(graph=graph, config=self.spec.device.session_config(Purpose.INFERENCE)) as sess:
            interrupts.fault_point("restoring")
            model.restore(sess)
            sess.run(iterator.initializer)
            with data_errors(self.spec.cfg.dataset):
                while True:
                    interrupts.check()  # an evaluation during training runs where signals are deferred
                    try:
                        collected.add(sess.run(fetches, {floor: collected.mistakes.floor}))
                    except tf.errors.OutOfRangeError:
                        break
                    interrupts.fault_point("evaluating")
        result, confusion, arrays = self._result(checkpoint, collected, skipped_records(graph), model,
                                                 time.time() - started)
        result.update(note or {})
        write_outputs(self.spec.run_dir, result, confusion, arrays, self.class_names,
                      sources=collected.sources if self.spec.cfg.eval.save_predictions else None,
                      mistakes=collected.mistakes.worst() if self.spec.cfg.eval.mistakes else None)
        log.info("eval of %s (%s weights): top1 %.4f top5 %.4f over %d images", checkpoint, result["weights"],
                 result["top1"], result["top5"], result["num_images"])
        return result

    def _result(self, checkpoint, collected, skipped, model, seconds):
        """(eval.json's fields, the confusion matrix, the EvalArrays)."""
        spec = self.spec
        if skipped:
            log.warning("skipped %d bad record(s) of the validation set (dataset.skip_bad_records)", skipped)
        n = collected.count
        if n == 0:
            why = "all {} record(s) were bad and skipped (dataset.skip_bad_records)".format(skipped) if skipped \
                else "they hold no records"
            raise UserError("no validation images to evaluate in {} ({}): {}".format(
                spec.source.data_dir, files_text(spec.source.eval_files), why))
        if spec.source.num_eval and spec.source.num_eval != n + skipped:
            log.warning("evaluated %d images but the dataset is said to hold %d", n, spec.source.num_eval)
        arrays = collected.arrays.arrays()
        fields, confusion = evaluation_metrics(arrays, self.class_names)
        fields.update({"loss": collected.loss_sum / n, "num_images": n, "checkpoint": os.path.abspath(checkpoint),
                       "step": model.step, "model": spec.model.name, "image_size": spec.image_size,
                       "images_per_sec": n / max(seconds, 1e-9), "skipped_records": skipped,
                       "weights": model.weights, "flip_tta": bool(spec.cfg.eval.flip_tta),
                       "format": model.format})
        return fields, confusion, arrays
