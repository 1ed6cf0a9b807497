"""tf.data input pipeline over ImageNet-style TFRecords (TF-Slim / TPU format).

Works on TF 1.15 and TF 2.x in graph mode: build inside `with tf.Graph().as_default():` and
consume with `tf.compat.v1.data.make_one_shot_iterator(ds)` (or make_initializable_iterator)
in a `tf.compat.v1.Session`.
"""
import os
import struct

import tensorflow as tf

from effnet_exp.data import preprocessing

AUTOTUNE = tf.data.experimental.AUTOTUNE

# Read buffer per TFRecord file (as in the reference input pipeline).
_READ_BUFFER_BYTES = 8 * 1024 * 1024

def _autotune(value):
    value = int(value)
    return AUTOTUNE if value < 0 else value


# --------------------------------------------------------------------------- records


def parse_record(serialized, cfg):
    """Parse one serialized tf.train.Example -> (image_bytes string, label int32 scalar).

    Keys come from cfg.image_key / cfg.label_key; the label may be stored as a single int64
    (scalar or shape [1], which is the same thing in an Example) and cfg.label_offset is subtracted.
    """
    image_key = getattr(cfg, "image_key", "image/encoded")
    label_key = getattr(cfg, "label_key", "image/class/label")
    label_offset = int(getattr(cfg, "label_offset", 0))
    features = {
        image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
        # A single int64 value; parsing as [1] then reshaping accepts both spellings.
        label_key: tf.io.FixedLenFeature([1], tf.int64),
    }
    parsed = tf.io.parse_single_example(serialized, features)
    image_bytes = parsed[image_key]
    label = tf.reshape(parsed[label_key], [])
    label = tf.cast(label, tf.int32) - label_offset
    return image_bytes, label


def _bytes_feature(value):
    if isinstance(value, str):
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64_feature(value):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(image_bytes, label, height=0, width=0, text="", filename="", image_format="JPEG",
                 image_key="image/encoded", label_key="image/class/label"):
    """A tf.train.Example with the TF-Slim ImageNet keys.

    image_key / label_key can be overridden (e.g. "image" / "label" as in the Ascend ModelZoo
    port); the other Slim keys are always written.
    """
    feature = {
        image_key: _bytes_feature(image_bytes),
        "image/format": _bytes_feature(image_format),
        label_key: _int64_feature(label),
        "image/class/text": _bytes_feature(text),
        "image/height": _int64_feature(height),
        "image/width": _int64_feature(width),
        "image/filename": _bytes_feature(filename),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_example(writer, image_bytes, label, **kwargs):
    """Serialize make_example(image_bytes, label, **kwargs) into an open tf.io.TFRecordWriter."""
    writer.write(make_example(image_bytes, label, **kwargs).SerializeToString())


def write_tfrecord(path, examples):
    """Write an iterable of tf.train.Example (or already serialized bytes) to one file; returns the count."""
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            if not isinstance(example, bytes):
                example = example.SerializeToString()
            writer.write(example)
            count += 1
    return count


# --------------------------------------------------------------------------- files


def list_files(data_dir, pattern):
    """Sorted list of files in data_dir matching the glob pattern; clear error when none match."""
    if data_dir is None:
        raise ValueError("dataset data_dir is not set (pattern {!r})".format(pattern))
    data_dir = str(data_dir)
    if "://" not in data_dir:
        data_dir = os.path.expanduser(data_dir)
    if not tf.io.gfile.isdir(data_dir):
        raise FileNotFoundError(
            "dataset folder {!r} does not exist (looking for files matching {!r})".format(
                data_dir, pattern))
    files = sorted(tf.io.gfile.glob(os.path.join(data_dir, pattern)))
    if not files:
        raise FileNotFoundError(
            "no files matching {!r} in dataset folder {!r}".format(pattern, data_dir))
    return files


def _count_local(path):
    """Count records by walking the TFRecord length headers (no payload read, no CRC check)."""
    size = os.path.getsize(path)
    count = 0
    pos = 0
    with open(path, "rb") as handle:
        while pos < size:
            header = handle.read(8)
            if len(header) != 8:
                raise ValueError("truncated TFRecord header in {!r} at byte {}".format(path, pos))
            (length,) = struct.unpack("<Q", header)
            # header (8) + header crc (4) + payload + payload crc (4)
            pos += 8 + 4 + length + 4
            if pos > size:
                raise ValueError("truncated TFRecord in {!r} (record {})".format(path, count))
            handle.seek(pos)
            count += 1
    return count


def count_records(files):
    """Total number of records in uncompressed TFRecord files (a path or a list of paths)."""
    if isinstance(files, (str, bytes)):
        files = [files]
    total = 0
    for path in files:
        if isinstance(path, bytes):
            path = path.decode("utf-8")
        if "://" not in path and os.path.isfile(path):
            total += _count_local(path)
        else:
            total += sum(1 for _ in tf.compat.v1.io.tf_record_iterator(path))
    return total


# --------------------------------------------------------------------------- dataset


_TF1 = tf.__version__.startswith("1.")


def _apply_options(dataset, deterministic):
    options = tf.data.Options()
    if hasattr(options, "deterministic"):  # TF >= 2.5
        options.deterministic = bool(deterministic)
    else:  # TF 1.15
        options.experimental_deterministic = bool(deterministic)
    if _TF1:
        # TF 1.15 bug: with the autotuning model on, closing a session while a parallel
        # interleave still has elements in flight can segfault (its worker thread destroys an
        # iterator after the model is gone: Model::RemoveNode). AUTOTUNE parallelism still
        # starts at the thread-pool size and prefetch(AUTOTUNE) keeps its own buffer tuner.
        options.experimental_optimization.autotune = False
    return dataset.with_options(options)


def build_dataset(cfg, data_dir, pattern, batch_size, image_size, is_training, seed=None,
                  num_shards=1, shard_index=0):
    """tf.data.Dataset of (images float32 [B, S, S, 3] normalised, labels int32 [B]).

    Training: seeded file shuffle, file-level sharding when there are at least num_shards files
    (else record-level), parallel interleave, endless repeat, record shuffle, parallel map,
    batch(drop_remainder=True), prefetch. Evaluation: files in order, no shuffle or repeat,
    batch(drop_remainder=False) so every record is seen exactly once.
    """
    files = list_files(data_dir, pattern)
    image_size = int(image_size)
    batch_size = int(batch_size)
    num_shards = int(num_shards)
    shard_index = int(shard_index)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError("invalid sharding: shard_index {} of num_shards {}".format(
            shard_index, num_shards))
    file_level = num_shards > 1 and len(files) >= num_shards
    record_level = num_shards > 1 and not file_level
    normalization = getattr(cfg, "normalization", "imagenet")
    preprocessing.check_normalization(normalization)  # fail early, not inside the map function
    num_parallel_calls = _autotune(getattr(cfg, "num_parallel_calls", -1))
    prefetch = int(getattr(cfg, "prefetch", -1))

    dataset = tf.data.Dataset.from_tensor_slices(files)
    if file_level:
        dataset = dataset.shard(num_shards, shard_index)
    num_local_files = len(files[shard_index::num_shards]) if file_level else len(files)

    if is_training:
        # With record-level sharding all workers must agree on the file order.
        file_seed = seed if (seed is not None or not record_level) else 0
        dataset = dataset.shuffle(num_local_files, seed=file_seed, reshuffle_each_iteration=True)
        dataset = dataset.repeat()
        cycle_length = max(1, min(int(getattr(cfg, "cycle_length", 8)), num_local_files))
        dataset = dataset.interleave(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=cycle_length,
            block_length=1,
            num_parallel_calls=cycle_length)
        if record_level:
            dataset = dataset.shard(num_shards, shard_index)
        shuffle_buffer = int(getattr(cfg, "shuffle_buffer", 1024))
        if shuffle_buffer > 1:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)

        def _train_map(serialized):
            image_bytes, label = parse_record(serialized, cfg)
            image = preprocessing.preprocess_image(image_bytes, image_size, True, cfg=cfg, seed=seed)
            return preprocessing.normalize(image, normalization), label

        dataset = dataset.map(_train_map, num_parallel_calls=num_parallel_calls)
        dataset = dataset.batch(batch_size, drop_remainder=True)
        # Ordered output (reproducible) when seeded or when workers must agree on record order.
        deterministic = seed is not None or record_level
    else:
        dataset = dataset.flat_map(
            lambda path: tf.data.TFRecordDataset(path, buffer_size=_READ_BUFFER_BYTES))
        if record_level:
            dataset = dataset.shard(num_shards, shard_index)

        def _eval_map(serialized):
            image_bytes, label = parse_record(serialized, cfg)
            image = preprocessing.preprocess_image(image_bytes, image_size, False, cfg=cfg)
            return preprocessing.normalize(image, normalization), label

        dataset = dataset.map(_eval_map, num_parallel_calls=num_parallel_calls)
        dataset = dataset.batch(batch_size, drop_remainder=False)
        deterministic = True
    if prefetch != 0:
        dataset = dataset.prefetch(_autotune(prefetch))
    return _apply_options(dataset, deterministic)
