"""The TFRecord format of our datasets (TF-Slim / TPU ImageNet keys): writing records, listing and counting
files, and reading one record back to check it in Python."""
import os
import struct

import tensorflow as tf

from effnet_exp.data.folder import image_problem, sniff_image_format

# Framing around each TFRecord payload: length (8) + length CRC (4) + payload CRC (4).
RECORD_OVERHEAD = 16


# --------------------------------------------------------------------------- writing


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


def serialize_example(example):
    """Bytes of a tf.train.Example with its feature map in key order (the same bytes on every run)."""
    return example.SerializeToString(deterministic=True)


def write_example(writer, image_bytes, label, **kwargs):
    """Serialize make_example(image_bytes, label, **kwargs) into an open writer (see open_writer)."""
    writer.write(serialize_example(make_example(image_bytes, label, **kwargs)))


def open_writer(path):
    """A TFRecord writer on path: write(serialized bytes), close()."""
    return tf.io.TFRecordWriter(path)


def write_tfrecord(path, examples):
    """Write an iterable of tf.train.Example (or already serialized bytes) to one file; returns the count."""
    count = 0
    with open_writer(path) as writer:
        for example in examples:
            if not isinstance(example, bytes):
                example = serialize_example(example)
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
            pos += RECORD_OVERHEAD + length
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


def file_size(path):
    if "://" not in path:
        return os.path.getsize(path)
    return int(tf.io.gfile.stat(path).length)


# --------------------------------------------------------------------------- checking one record in Python


def read_record(path, index):
    """The payload of record `index` of a TFRecord file (reads up to it)."""
    for i, payload in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
        if i == index:
            return payload
    raise IndexError("{} has fewer than {} records".format(path, index + 1))


def image_data(payload, image_key):
    """The image bytes of a serialized record that inspect_payload found no problem with."""
    return tf.train.Example.FromString(payload).features.feature[image_key].bytes_list.value[0]


def inspect_payload(payload, cfg):
    """(label after offset or None, problem or None) for one serialized record, checked in Python against
    the DatasetConfig cfg (its image_key, label_key and label_offset).

    The problem says what is wrong in a few words: not an Example, no image key, image bytes that are
    neither JPEG nor PNG, no (single int64) label. Image data is not decoded here.
    """
    try:
        example = tf.train.Example.FromString(payload)
    except Exception:  # protobuf's DecodeError: its module differs between protobuf versions
        return None, "is not a serialized tf.train.Example"
    feature = example.features.feature
    image_key, label_key = cfg.image_key, cfg.label_key
    if image_key not in feature or not feature[image_key].bytes_list.value or \
            not feature[image_key].bytes_list.value[0]:
        keys = ", ".join(sorted(feature)) or "none"
        return None, "has no {!r} image bytes (its keys: {})".format(image_key, keys)
    if label_key not in feature or len(feature[label_key].int64_list.value) != 1:
        return None, "has no single int64 {!r} label".format(label_key)
    label = int(feature[label_key].int64_list.value[0]) - int(cfg.label_offset)
    data = feature[image_key].bytes_list.value[0]
    fmt = sniff_image_format(data)
    if fmt not in ("jpeg", "png"):
        return label, "holds {} image data, not JPEG or PNG".format(fmt.upper() if fmt else "unrecognised")
    problem = image_problem(data)
    return label, "its image " + problem if problem else None
