"""Top-1 / top-5 over the whole validation set, every image exactly once; writes eval.json."""
import logging
import os
import time

import tensorflow as tf

from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.restore import WeightsPlan, model_variables
from effnet_exp.run_files import atomic_write_json
from effnet_exp.training.checkpoints import checkpoint_step
from effnet_exp.training.summaries import write_scalars

log = logging.getLogger(__name__)


class Evaluator(object):
    def __init__(self, cfg, source, run_dir, session_config, image_size):
        self.cfg = cfg
        self.source = source
        self.run_dir = run_dir
        self.session_config = session_config
        self.image_size = image_size

    def _build(self):
        cfg = self.cfg
        dataset = build_dataset(self.source, cfg.dataset, is_training=False, batch_size=cfg.eval.batch_size,
                                image_size=self.image_size, normalization=cfg.dataset.normalization)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        images, labels = iterator.get_next()
        logits, _ = build_efficientnet(images, cfg.model, is_training=False)
        num_classes = cfg.model.num_classes
        losses = tf.compat.v1.losses.softmax_cross_entropy(
            tf.one_hot(labels, num_classes), logits, reduction=tf.compat.v1.losses.Reduction.NONE)
        def hits(k):
            found = tf.compat.v1.nn.in_top_k(predictions=tf.cast(logits, tf.float32), targets=labels, k=k)
            return tf.reduce_sum(tf.cast(found, tf.int64))

        counts = {
            "top1": hits(1),
            "top5": hits(min(5, num_classes)),
            "num_images": tf.size(labels, out_type=tf.int64),
            "loss_sum": tf.reduce_sum(tf.cast(losses, tf.float64)),
        }
        return iterator, counts

    def evaluate(self, checkpoint):
        graph = tf.Graph()
        with graph.as_default():
            iterator, count_ops = self._build()
            scope = self.cfg.model.name
            # eval.use_ema: the checkpoint's /ExponentialMovingAverage weights when it has them (a run trained
            # with train.ema_decay, or an official checkpoint), else its raw weights.
            weights = "ema" if getattr(self.cfg.eval, "use_ema", True) else "raw"
            plan = WeightsPlan(checkpoint, model_variables(scope), scope, weights)
            saver = plan.saver()
        graph.finalize()
        totals = {k: 0 for k in count_ops}
        started = time.time()
        with tf.compat.v1.Session(graph=graph, config=self.session_config) as sess:
            saver.restore(sess, checkpoint)
            sess.run(iterator.initializer)
            with data_errors(self.cfg.dataset):
                while True:
                    try:
                        values = sess.run(count_ops)
                    except tf.errors.OutOfRangeError:
                        break
                    for k, v in values.items():
                        totals[k] += v
        skipped = skipped_records(graph)
        if skipped:
            log.warning("skipped %d bad record(s) of the validation set (dataset.skip_bad_records)", skipped)
        n = int(totals["num_images"])
        if n == 0:
            raise RuntimeError("the validation set under {} is empty".format(self.source.data_dir))
        step = checkpoint_step(checkpoint)
        result = {
            "top1": totals["top1"] / float(n),
            "top5": totals["top5"] / float(n),
            "loss": float(totals["loss_sum"]) / n,
            "num_images": n,
            "checkpoint": os.path.abspath(checkpoint),
            "step": step,
            "model": self.cfg.model.name,
            "image_size": self.image_size,
            "images_per_sec": n / max(time.time() - started, 1e-9),
            "skipped_records": skipped,
            "weights": "ema" if plan.uses_ema else "raw",
        }
        if self.source.num_eval and self.source.num_eval != n + skipped:
            log.warning("evaluated %d images but the dataset is said to hold %d", n, self.source.num_eval)
        atomic_write_json(os.path.join(self.run_dir, "eval.json"), result)
        with tf.Graph().as_default():
            writer = tf.compat.v1.summary.FileWriter(os.path.join(self.run_dir, "tensorboard", "eval"))
            try:
                write_scalars(writer, step or 0, {"top1": result["top1"], "top5": result["top5"],
                                                  "loss": result["loss"]})
            finally:
                writer.close()
        log.info("eval of %s (%s weights): top1 %.4f top5 %.4f over %d images", checkpoint, result["weights"],
                 result["top1"], result["top5"], n)
        return result
