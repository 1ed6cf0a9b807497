"""Small real datasets that ship inside installed packages, converted once to ImageNet-style TFRecords.

`prepare_builtin("digits", cache_dir)` turns scikit-learn's bundled handwritten digits (1797 8x8
greyscale images, 10 classes, no download) into 32x32 RGB JPEGs in TFRecords with the TF-Slim
keys (label offset 0), under `<cache_dir>/digits-v1`:

    train-00000-of-00002, train-00001-of-00002, validation-00000-of-00001, labels.txt, manifest.json

The conversion writes into a temporary sibling folder that is renamed into place at the end, so
an interrupted run never leaves a folder that looks complete. An existing folder with a manifest
is reused without writing anything.
"""
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from effnet_exp.data.config import Builtin, LABELS_FILE, MANIFEST
from effnet_exp.data.records import make_example, write_tfrecord
from effnet_exp.optional import load_digits


_DIGITS_VERSION = "digits-v1"
_DIGITS_SIZE = 32
_DIGITS_EVAL_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 20240601
_DIGITS_TRAIN_SHARDS = 2
_JPEG_QUALITY = 95


def _shard_name(split, index, total):
    return "{}-{:05d}-of-{:05d}".format(split, index, total)


def _encode_jpegs(images, quality=_JPEG_QUALITY):
    """JPEG-encode uint8 [N, H, W, 3] images with TensorFlow in a private graph and session."""
    graph = tf.Graph()
    with graph.as_default():
        with tf.device("/cpu:0"):
            pixels = tf.constant(images, dtype=tf.uint8)
            encoded = tf.compat.v1.map_fn(
                lambda image: tf.image.encode_jpeg(image, format="rgb", quality=quality),
                pixels, dtype=tf.string, back_prop=False)
        config = tf.compat.v1.ConfigProto(device_count={"GPU": 0})
        with tf.compat.v1.Session(graph=graph, config=config) as sess:
            return list(sess.run(encoded))


def _stratified_split(labels, eval_fraction, seed):
    """Deterministic per-class split -> (train_indices shuffled, eval_indices sorted)."""
    rng = np.random.RandomState(seed)
    train, evaluation = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        n_eval = int(round(eval_fraction * len(idx)))
        n_eval = min(max(n_eval, 1), len(idx) - 1)
        evaluation.extend(idx[:n_eval].tolist())
        train.extend(idx[n_eval:].tolist())
    train = np.asarray(train, dtype=np.int64)
    train = train[rng.permutation(len(train))]
    return train, np.sort(np.asarray(evaluation, dtype=np.int64))


def _digits_arrays():
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # [N, 8, 8], values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    pixels = np.clip(np.round(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    factor = _DIGITS_SIZE // pixels.shape[1]
    pixels = np.repeat(np.repeat(pixels, factor, axis=1), factor, axis=2)  # nearest upscale
    pixels = np.stack([pixels] * 3, axis=-1)  # greyscale -> RGB
    class_names = [str(name) for name in digits.target_names]
    return pixels, labels, class_names


def _write_digits(folder):
    pixels, labels, class_names = _digits_arrays()
    encoded = _encode_jpegs(pixels)
    train_idx, eval_idx = _stratified_split(labels, _DIGITS_EVAL_FRACTION, _DIGITS_SPLIT_SEED)
    height, width = pixels.shape[1], pixels.shape[2]

    def examples(indices):
        for i in indices:
            label = int(labels[i])
            yield make_example(
                encoded[i], label, height=height, width=width, text=class_names[label],
                filename="digits_{:04d}.jpg".format(int(i)), image_format="JPEG")

    splits = {}
    plan = [("train", np.array_split(train_idx, _DIGITS_TRAIN_SHARDS)),
            ("validation", [eval_idx])]
    for split, shards in plan:
        names = []
        for index, shard in enumerate(shards):
            name = _shard_name(split, index, len(shards))
            write_tfrecord(os.path.join(folder, name), examples(shard))
            names.append(name)
        indices = np.concatenate(shards)
        per_class = {name: int(np.sum(labels[indices] == cls)) for cls, name in enumerate(class_names)}
        splits[split] = {"num_records": int(len(indices)), "per_class": per_class, "files": names}

    with open(os.path.join(folder, LABELS_FILE), "w") as handle:
        handle.write("".join(name + "\n" for name in class_names))
    manifest = {
        "name": "digits",
        "version": _DIGITS_VERSION,
        "source": "sklearn.datasets.load_digits",
        "format": "tfrecord/tf.train.Example (image/encoded JPEG, image/class/label int64)",
        "image_size": _DIGITS_SIZE,
        "num_classes": len(class_names),
        "label_offset": 0,
        "class_names": class_names,
        "eval_fraction": _DIGITS_EVAL_FRACTION,
        "split_seed": _DIGITS_SPLIT_SEED,
        "jpeg_quality": _JPEG_QUALITY,
        "splits": splits,
    }
    # Written last: its presence marks the folder complete.
    with open(os.path.join(folder, MANIFEST), "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)


_BUILTINS = {
    Builtin.digits.value: (_DIGITS_VERSION, _write_digits),
}


def known_builtins():
    return sorted(_BUILTINS)


def _summary(folder):
    with open(os.path.join(folder, MANIFEST)) as handle:
        manifest = json.load(handle)
    return {
        "data_dir": folder,
        "num_classes": int(manifest["num_classes"]),
        "num_train": int(manifest["splits"]["train"]["num_records"]),
        "num_eval": int(manifest["splits"]["validation"]["num_records"]),
        "class_names": list(manifest["class_names"]),
        "image_size": int(manifest["image_size"]),
    }


def prepare_builtin(name, cache_dir="~/.cache/effnet_exp"):
    """Convert the named bundled dataset once into cache_dir and describe it.

    Returns a dict with data_dir, num_classes, num_train, num_eval, class_names (and image_size).
    Train files match "train-*", eval files "validation-*"; labels start at 0.
    """
    if name not in _BUILTINS:
        raise ValueError("unknown builtin dataset {!r}; known: {}".format(
            name, ", ".join(known_builtins())))
    version, writer = _BUILTINS[name]
    root = os.path.abspath(os.path.expanduser(str(cache_dir)))
    final = os.path.join(root, version)
    if os.path.isfile(os.path.join(final, MANIFEST)):
        return _summary(final)
    if os.path.exists(final):
        # A folder without a manifest is not ours to trust (or to delete): refuse clearly.
        raise RuntimeError(
            "{!r} exists but has no {}; remove it to let the dataset be converted again".format(
                final, MANIFEST))
    if not os.path.isdir(root):
        os.makedirs(root)
    tmp = tempfile.mkdtemp(prefix="." + version + ".tmp-", dir=root)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it normal permissions
        writer(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished first: use its copy.
            if not os.path.isfile(os.path.join(final, MANIFEST)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _summary(final)
