"""The training loop: one graph, one session, one sess.run per step."""
import logging
import math
import os
import time

import numpy as np
import tensorflow as tf

from effnet_exp.data.pipeline import build_dataset
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.run_files import CHECKPOINT_DIR, CHECKPOINT_PREFIX, append_jsonl
from effnet_exp.training.checkpoints import latest_in
from effnet_exp.training.optimizers import build_optimizer
from effnet_exp.training.summaries import write_scalars

log = logging.getLogger(__name__)


def cross_entropy_loss(logits, labels, num_classes):
    onehot = tf.one_hot(labels, num_classes)
    return tf.compat.v1.losses.softmax_cross_entropy(onehot, logits)


def top_k_accuracy(logits, labels, k):
    hits = tf.compat.v1.nn.in_top_k(predictions=tf.cast(logits, tf.float32), targets=labels,
                                    k=min(k, int(logits.shape[-1])))
    return tf.reduce_mean(tf.cast(hits, tf.float32))


def total_train_steps(train_cfg, num_train_images):
    if train_cfg.steps is not None:
        return int(train_cfg.steps)
    return int(math.ceil(train_cfg.epochs * num_train_images / float(train_cfg.batch_size)))


class Trainer(object):
    """Builds the training graph from the run config and runs it, writing into run_dir."""

    def __init__(self, cfg, source, run_dir, session_config, image_size):
        self.cfg = cfg
        self.source = source
        self.run_dir = run_dir
        self.session_config = session_config
        self.image_size = image_size
        self.checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_train_steps(cfg.train, source.num_train)

    def build_step(self, images, labels, global_step):
        """Forward, loss and update for one batch; the unit a distribution strategy will replicate."""
        logits, _ = build_efficientnet(images, self.cfg.model, is_training=True)
        loss = cross_entropy_loss(logits, labels, self.cfg.model.num_classes)
        learning_rate = tf.constant(self.cfg.optimizer.lr, tf.float32, name="learning_rate")
        optimizer = build_optimizer(self.cfg.optimizer, learning_rate)
        update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(update_ops):
            train_op = optimizer.minimize(loss, global_step=global_step)
        return {"train_op": train_op, "loss": loss, "top1": top_k_accuracy(logits, labels, 1),
                "lr": learning_rate}

    def train(self):
        """Runs to train.steps (or train.epochs); returns the final checkpoint prefix and last metrics."""
        cfg = self.cfg
        graph = tf.Graph()
        with graph.as_default():
            tf.compat.v1.set_random_seed(cfg.seed)
            dataset = build_dataset(cfg.dataset, self.source.data_dir, cfg.dataset.train_pattern,
                                    cfg.train.batch_size, self.image_size, is_training=True, seed=cfg.seed)
            iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
            images, labels = iterator.get_next()
            global_step = tf.compat.v1.train.get_or_create_global_step()
            step_ops = self.build_step(images, labels, global_step)
            saver = tf.compat.v1.train.Saver(max_to_keep=cfg.train.keep_checkpoint_max,
                                             save_relative_paths=True)
            init = tf.compat.v1.global_variables_initializer()
            # Created in the graph's context: on TF 2.x, FileWriter refuses to work eagerly.
            writer = tf.compat.v1.summary.FileWriter(os.path.join(self.run_dir, "tensorboard", "train"), graph)
            graph.finalize()
            try:
                with tf.compat.v1.Session(graph=graph, config=self.session_config) as sess:
                    step = self._init_or_resume(sess, saver, init, global_step)
                    sess.run(iterator.initializer)
                    return self._loop(sess, step, step_ops, saver, writer)
            finally:
                writer.close()

    def _init_or_resume(self, sess, saver, init, global_step):
        sess.run(init)
        resume_from = latest_in(self.checkpoint_dir)
        if resume_from:
            saver.restore(sess, resume_from)
            log.info("resumed from %s", resume_from)
        return int(sess.run(global_step))

    def _loop(self, sess, step, step_ops, saver, writer):
        cfg = self.cfg.train
        batch = cfg.batch_size
        fetches = [step_ops["train_op"], step_ops["loss"], step_ops["top1"]]
        lr = float(self.cfg.optimizer.lr)
        prefix = os.path.join(self.checkpoint_dir, CHECKPOINT_PREFIX)
        log.info("training %s for %d steps of batch %d (%d images per epoch), from step %d",
                 self.cfg.model.name, self.total_steps, batch, self.source.num_train, step)
        losses, top1s = [], []
        interval_start, started = time.time(), time.time()
        saved_at, checkpoint = None, latest_in(self.checkpoint_dir)
        last, start_step = {"step": step}, step
        while step < self.total_steps:
            _, loss, top1 = sess.run(fetches)
            step += 1
            losses.append(loss)
            top1s.append(top1)
            if step % cfg.log_every == 0 or step == self.total_steps:
                now = time.time()
                last = {"step": step, "loss": float(np.mean(losses)), "top1": float(np.mean(top1s)),
                        "lr": lr, "images_per_sec": len(losses) * batch / max(now - interval_start, 1e-9),
                        "epoch": step * batch / float(self.source.num_train), "elapsed_sec": now - started}
                if not np.isfinite(last["loss"]):
                    last["loss"] = None  # JSON has no NaN
                append_jsonl(self.metrics_path, last)
                write_scalars(writer, step, {k: last[k] for k in ("loss", "top1", "lr", "images_per_sec")
                                             if last[k] is not None})
                eta = (self.total_steps - step) * (now - started) / (step - start_step)
                log.info("step %d/%d loss %.4f top1 %.3f lr %.3g %.1f img/s eta %.0fs", step,
                         self.total_steps, np.mean(losses), last["top1"], lr, last["images_per_sec"], eta)
                losses, top1s = [], []
                interval_start = time.time()
            if step % cfg.checkpoint_every == 0 or step == self.total_steps:
                checkpoint = saver.save(sess, prefix, global_step=step)
                saved_at = step
        if saved_at is None and checkpoint is None:
            checkpoint = saver.save(sess, prefix, global_step=step)
        last["checkpoint"] = checkpoint
        return last
