"""Images for the export: int8 calibration (the training split, eval preprocessing, a seeded choice) and the
report's evaluation (the eval split in order), as NumPy arrays read through the ordinary input pipeline."""
import logging
import random

import numpy as np
import tensorflow as tf

from effnet_exp.data.diagnostics import data_errors
from effnet_exp.data.pipeline import build_dataset

log = logging.getLogger(__name__)

READ_BATCH = 64
# Calibration draws its images from this many times as many of the (shuffled) training files' first records.
POOL_FACTOR = 4


def read_images(source, ds_cfg, image_size, normalization, limit=None, training_split=False):
    """(images float32 [N, S, S, 3] normalised, labels int32 [N]): the split's first `limit` images (all when
    None) with the eval preprocessing, in the pipeline's order."""
    if training_split:
        source = source._replace(eval_files=list(source.train_files), eval_items=list(source.train_items or []))
    images, labels, count = [], [], 0
    with tf.Graph().as_default():
        dataset = build_dataset(source, ds_cfg, is_training=False, batch_size=READ_BATCH, image_size=image_size,
                                normalization=normalization)
        if limit:
            dataset = dataset.unbatch().take(int(limit)).batch(READ_BATCH)
        batch = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        with tf.compat.v1.Session() as sess, data_errors(ds_cfg):
            while True:
                try:
                    x, y = sess.run(batch[:2])
                except tf.errors.OutOfRangeError:
                    break
                images.append(x)
                labels.append(y)
                count += len(y)
    if not count:
        return np.zeros([0, image_size, image_size, 3], np.float32), np.zeros([0], np.int32)
    return np.concatenate(images), np.concatenate(labels)


def calibration_images(source, ds_cfg, image_size, normalization, count, seed):
    """count images of the training split (fewer when it has fewer): a seeded choice among the first records
    of its files in a seeded order (a folder's images in a seeded order)."""
    rng = random.Random(seed)
    files = list(source.train_files or [])
    items = list(source.train_items or [])
    rng.shuffle(files)
    rng.shuffle(items)
    shuffled = source._replace(train_files=files, train_items=items)
    pool, _ = read_images(shuffled, ds_cfg, image_size, normalization, limit=POOL_FACTOR * int(count),
                          training_split=True)
    chosen = np.sort(np.random.RandomState(seed).permutation(len(pool))[:int(count)])
    log.info("int8 calibration: %d training images (eval preprocessing, seed %d) of %d read", len(chosen), seed,
             len(pool))
    return pool[chosen]
