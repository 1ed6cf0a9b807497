"""tf.data input pipeline over ImageNet-style TFRecords (TF-Slim / TPU format) or image folders.

Works on TF 1.15 and TF 2.x in graph mode: build inside `with tf.Graph().as_default():` and
consume with `tf.compat.v1.data.make_initializable_iterator(ds)` (or make_one_shot_iterator) in
a `tf.compat.v1.Session`.

Bad data is caught inside the graph, so the error can name the file and the record:

- each TFRecord file is read with its byte count checked against the file size at its end, so a
  truncated or corrupt file becomes a "broken" element (file, index of the first unreadable record)
  instead of an anonymous DataLossError;
- before the (parallel, order-keeping) decode map, every element gets a sequence number and the
  names of the few elements before it; errors in the map drop their element (`ignore_errors`), so a
  gap in the sequence numbers counts the bad records exactly, and the next good element names them.
  (Evaluation appends a terminal element, so a bad last record is caught too; end-of-file markers
  of good files are dropped before the map, so that it decodes every element it gets without a tf.cond.)

A bad record then either stops the run (default: an assertion whose message carries the file and
index; wrap the session loop in `data_errors(cfg)` to turn it into one UserError line with the precise
reason) or, with `skip_bad_records`, is dropped, logged and counted (`skipped_records(graph)`).
"""
import codecs
import contextlib
import logging
import os
import re
import struct
import threading
import weakref

import numpy as np
import tensorflow as tf

from effnet_exp.data import preprocessing
from effnet_exp.data.folder import sniff_image_format
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.experimental.AUTOTUNE

# Read buffer per TFRecord file (cfg.read_buffer_mb; TensorFlow's default size).
_READ_BUFFER_MB = 0.25
# Framing around each TFRecord payload: length (8) + length CRC (4) + payload CRC (4).
_RECORD_OVERHEAD = 16

_TF1 = tf.__version__.startswith("1.")

# What an element of the guarded stage stands for.
_RECORD, _FILE, _BROKEN, _END_OK, _TERMINAL = 0, 1, 2, 3, 4
_KIND_NAMES = ("record", "file", "broken", "end", "terminal")

BAD_RECORD_MARK = "EFFNET_EXP_BAD_RECORD"
BAD_LABEL_MARK = "EFFNET_EXP_BAD_LABEL"
_BAD_RECORD_RE = re.compile(r"\[" + BAD_RECORD_MARK + r"\] \[(\w+)\] \[(-?\d+)\] \[(.*)\]")
_BAD_LABEL_RE = re.compile(r"\[" + BAD_LABEL_MARK + r"\] \[(-?\d+)\] \[(-?\d+)\] \[(.*)\]")
# Skipped records logged one by one; further ones are only counted.
_LOG_FIRST_SKIPS = 20
# Each element carries the names of this many elements before it: a run of up to this many bad
# records in a row is named record by record (longer runs are counted, and their last ones named).
_REMEMBERED = 4


def _autotune(value):
    value = int(value)
    return AUTOTUNE if value < 0 else value


# --------------------------------------------------------------------------- records


def parse_record(serialized, cfg):
    """Parse one serialized tf.train.Example -> (image_bytes string, label int32 scalar).

    Keys come from cfg.image_key / cfg.label_key; the label may be stored as a single int64
    (scalar or shape [1], which is the same thing in an Example) and cfg.label_offset is subtracted.
    A missing image key gives empty image bytes; a missing label fails.
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


def serialize_example(example):
    """Bytes of a tf.train.Example with its feature map in key order (the same bytes on every run)."""
    return example.SerializeToString(deterministic=True)


def write_example(writer, image_bytes, label, **kwargs):
    """Serialize make_example(image_bytes, label, **kwargs) into an open tf.io.TFRecordWriter."""
    writer.write(serialize_example(make_example(image_bytes, label, **kwargs)))


def write_tfrecord(path, examples):
    """Write an iterable of tf.train.Example (or already serialized bytes) to one file; returns the count."""
    count = 0
    with tf.io.TFRecordWriter(path) as writer:
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


def file_size(path):
    if "://" not in path:
        return os.path.getsize(path)
    return int(tf.io.gfile.stat(path).length)


# --------------------------------------------------------------------------- checking records in Python


def read_record(path, index):
    """The payload of record `index` of a TFRecord file (reads up to it)."""
    for i, payload in enumerate(tf.compat.v1.io.tf_record_iterator(path)):
        if i == index:
            return payload
    raise IndexError("{} has fewer than {} records".format(path, index + 1))


def inspect_payload(payload, cfg):
    """(label after offset or None, problem or None) for one serialized record, checked in Python.

    The problem says what is wrong in a few words: not an Example, no image key, image bytes that are
    neither JPEG nor PNG, no (single int64) label. Image data is not decoded here.
    """
    image_key = getattr(cfg, "image_key", "image/encoded")
    label_key = getattr(cfg, "label_key", "image/class/label")
    try:
        example = tf.train.Example.FromString(payload)
    except Exception:  # protobuf's DecodeError: its module differs between protobuf versions
        return None, "is not a serialized tf.train.Example"
    feature = example.features.feature
    if image_key not in feature or not feature[image_key].bytes_list.value or \
            not feature[image_key].bytes_list.value[0]:
        keys = ", ".join(sorted(feature)) or "none"
        return None, "has no {!r} image bytes (its keys: {})".format(image_key, keys)
    if label_key not in feature or len(feature[label_key].int64_list.value) != 1:
        return None, "has no single int64 {!r} label".format(label_key)
    label = int(feature[label_key].int64_list.value[0]) - int(getattr(cfg, "label_offset", 0))
    fmt = sniff_image_format(feature[image_key].bytes_list.value[0])
    if fmt not in ("jpeg", "png"):
        return label, "holds {} image data, not JPEG or PNG".format(fmt.upper() if fmt else "unrecognised")
    return label, None


def _describe_file(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError) as err:
        return "cannot be read ({})".format(err.strerror or err)
    fmt = sniff_image_format(data)
    if fmt not in ("jpeg", "png"):
        return "is not a JPEG or PNG image ({})".format(
            "it is {} data".format(fmt.upper()) if fmt else "unrecognised data")
    return "its {} data cannot be decoded (corrupt or truncated)".format(fmt.upper())


def describe_bad_record(kind, path, index, cfg=None):
    """One line naming a bad record and what is wrong with it (re-reads it in Python to say what)."""
    if kind == "file":
        return "bad image {}: {}".format(path, _describe_file(path))
    where = "record {} of {}".format(index, path)
    if kind == "broken":
        return "{}: the TFRecord data is truncated or corrupt from this record on (it and the rest of " \
               "the file cannot be read)".format(where)
    try:
        payload = read_record(path, index)
    except (tf.errors.OpError, IndexError, IOError, OSError) as err:
        return "{}: cannot be read again ({})".format(where, getattr(err, "message", None) or err)
    _, problem = inspect_payload(payload, cfg)
    if problem is None:
        fmt = sniff_image_format(tf.train.Example.FromString(payload).features.feature[
            getattr(cfg, "image_key", "image/encoded")].bytes_list.value[0])
        problem = "its {} image data cannot be decoded (corrupt or truncated)".format(fmt.upper())
    return "{}: {}".format(where, problem)


def _unescape(text):
    """Undo the C escaping TensorFlow applies to strings printed in assertion messages."""
    try:
        return codecs.escape_decode(text.encode("utf-8"))[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return text


def bad_data_message(err, cfg=None):
    """One line for an error raised by a bad record of a build_dataset pipeline, or None for other errors."""
    message = getattr(err, "message", None) or str(err)
    found = _BAD_RECORD_RE.search(message)
    if found:
        kind, index, path = found.group(1), int(found.group(2)), _unescape(found.group(3))
        return "{} (set dataset.skip_bad_records=true to skip and count bad records)".format(
            describe_bad_record(kind, path, index, cfg))
    found = _BAD_LABEL_RE.search(message)
    if found:
        label, index, path = int(found.group(1)), int(found.group(2)), _unescape(found.group(3))
        offset = int(getattr(cfg, "label_offset", 0))
        return "record {} of {}: label {} (stored {} minus dataset.label_offset={}) is outside [0, {}); " \
               "check dataset.num_classes and dataset.label_offset".format(
                   index, path, label, label + offset, offset, getattr(cfg, "num_classes", "?"))
    if preprocessing.UNSUPPORTED_FORMAT_MESSAGE in message:
        return preprocessing.UNSUPPORTED_FORMAT_MESSAGE
    return None


@contextlib.contextmanager
def data_errors(cfg=None):
    """Turn a bad-record error of a build_dataset pipeline into one UserError line naming the file and
    record (other errors pass through). Wrap the session loop that pulls from the dataset in it."""
    try:
        yield
    except tf.errors.OpError as err:
        message = bad_data_message(err, cfg)
        if message is None:
            raise
        raise UserError(message) from None


class _SkipCounter(object):
    """Counts and logs the bad records a pipeline skipped (called from the graph through py_func)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.count = 0
        self._lock = threading.Lock()

    def note(self, kinds, indices, paths, missing):
        """`missing` bad records in a row were skipped; the last of them are the last of kinds, indices,
        paths (the elements remembered before the next good one)."""
        missing = int(missing)
        with self._lock:
            first = self.count + 1
            self.count += missing
            count = self.count
        if first <= _LOG_FIRST_SKIPS:
            named = min(missing, len(paths))
            if missing > named:
                log.warning("skipped %d bad records in a row; the last %d:", missing, named)
            for kind, index, path in list(zip(kinds, indices, paths))[len(paths) - named:]:
                kind = _KIND_NAMES[int(kind)]
                path = path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)
                try:
                    what = describe_bad_record(kind, path, int(index), self.cfg)
                except Exception as err:  # the log line must not break the pipeline
                    what = "{} {} of {} ({})".format(kind, int(index), path, err)
                log.warning("skipped %s", what)
            if count >= _LOG_FIRST_SKIPS:
                log.warning("further bad records are skipped and counted without a log line each")
        return np.int64(count)


_SKIP_COUNTERS = weakref.WeakKeyDictionary()


def skipped_records(graph=None):
    """How many bad records the datasets built in graph (default: the default graph) have skipped so far
    (dataset.skip_bad_records=true). A training epoch that meets a bad record counts it every time."""
    graph = graph if graph is not None else tf.compat.v1.get_default_graph()
    return sum(counter.count for counter in _SKIP_COUNTERS.get(graph, ()))


# --------------------------------------------------------------------------- dataset


def _ignore_errors(dataset):
    if hasattr(dataset, "ignore_errors"):
        return dataset.ignore_errors()
    return dataset.apply(tf.data.experimental.ignore_errors())


def _scan(dataset, initial_state, fn):
    if hasattr(dataset, "scan"):
        return dataset.scan(initial_state, fn)
    return dataset.apply(tf.data.experimental.scan(initial_state, fn))


def _unbatch(dataset):
    if hasattr(dataset, "unbatch"):
        return dataset.unbatch()
    return dataset.apply(tf.data.experimental.unbatch())


def _ordered_map(dataset, fn, num_parallel_calls):
    if _TF1:
        return dataset.map(fn, num_parallel_calls=num_parallel_calls)
    return dataset.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)


def _where(condition, x, y):
    return tf.compat.v1.where(condition, x, y)


def _read_checked(path, size, buffer_bytes):
    """Records of one TFRecord file as (path, index, payload, kind): kind _RECORD for each record, then
    one _END_OK element if the file was read to its end, else one _BROKEN element whose index is the
    first record that could not be read."""
    records = _ignore_errors(tf.data.TFRecordDataset(path, buffer_size=buffer_bytes))
    indexed = tf.data.Dataset.zip((tf.data.Dataset.range(2 ** 62), records))
    end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant("", tf.string)))

    def step(state, element):
        consumed, count = state
        index, payload = element
        at_end = tf.less(index, 0)
        length = tf.cast(tf.strings.length(payload), tf.int64) + _RECORD_OVERHEAD
        kind = _where(at_end, _where(tf.equal(consumed, size), _END_OK, _BROKEN), _RECORD)
        new_state = (_where(at_end, consumed, consumed + length),
                     _where(at_end, count, count + 1))
        return new_state, (path, _where(at_end, count, index), payload, kind)

    zero = tf.constant(0, tf.int64)
    return _scan(indexed.concatenate(end), (zero, zero), step)


def _is_source(obj):
    return hasattr(obj, "train_files") and hasattr(obj, "eval_files") and hasattr(obj, "data_dir")


def _apply_options(dataset, cfg):
    options = tf.data.Options()
    # Always ordered: the bad-record probes rely on it (and runs are reproducible).
    if hasattr(options, "deterministic"):  # TF >= 2.5
        options.deterministic = True
    else:  # TF 1.15
        options.experimental_deterministic = True
    threading_options = getattr(options, "threading", None) or options.experimental_threading
    pool = int(getattr(cfg, "private_threadpool_size", 0) or 0)
    if pool > 0:
        threading_options.private_threadpool_size = pool
    intra = int(getattr(cfg, "max_intra_op_parallelism", 0) or 0)
    if intra > 0:
        threading_options.max_intra_op_parallelism = intra
    autotune = bool(getattr(cfg, "autotune", True))
    if _TF1:
        # TF 1.15 bug: with the autotuning model on, closing a session while a parallel
        # interleave still has elements in flight can segfault (its worker thread destroys an
        # iterator after the model is gone: Model::RemoveNode). AUTOTUNE parallelism still
        # starts at the thread-pool size and prefetch(AUTOTUNE) keeps its own buffer tuner.
        autotune = False
    if hasattr(options, "autotune") and hasattr(options.autotune, "enabled"):
        options.autotune.enabled = autotune
    else:
        options.experimental_optimization.autotune = autotune
    return dataset.with_options(options)


def build_dataset(cfg, data_dir, pattern, batch_size, image_size, is_training, seed=None,
                  num_shards=1, shard_index=0, start_position=0):
    """tf.data.Dataset of (images float32 [B, S, S, 3] normalised, labels int32 [B]).

    data_dir: a folder of TFRecord files (matched by pattern), or the DataSource that
    `resolve_data_source` returned (then pattern is ignored: is_training picks its train or eval
    files, or its (path, label) lists for an image folder).

    Training: file-level sharding when there are at least num_shards files (else record-level), then
    endless epochs, each with its own file order, parallel interleave and record shuffle (serialized
    records, bounded by cfg.shuffle_buffer), all depending only on (seed, epoch); parallel map,
    batch(drop_remainder=True), prefetch. start_position: records (or images) this reader delivered
    before a resume; the stream continues right after them, as if it had never stopped.
    Evaluation: no shuffle or repeat, every good record exactly once, batch(drop_remainder=False).
    Output order is deterministic. Bad records stop the iterator with an error naming the file and
    record (see `data_errors`) or, with cfg.skip_bad_records, are skipped and counted.
    """
    image_size = int(image_size)
    batch_size = int(batch_size)
    num_shards = int(num_shards)
    shard_index = int(shard_index)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError("invalid sharding: shard_index {} of num_shards {}".format(
            shard_index, num_shards))
    normalization = getattr(cfg, "normalization", "imagenet")
    preprocessing.check_normalization(normalization)  # fail early, not inside the map function
    num_classes = int(getattr(cfg, "num_classes", 0) or 0)
    items = None
    if not _is_source(data_dir) and getattr(cfg, "root", None):
        # An image folder given by its config alone (dataset.root): scan it here.
        from effnet_exp.data.source import resolve_data_source

        data_dir = resolve_data_source(cfg, need_train=is_training, need_eval=not is_training)
    if _is_source(data_dir):
        source = data_dir
        num_classes = int(getattr(source, "num_classes", None) or num_classes)
        if getattr(source, "kind", "tfrecord") == "folder":
            items = source.train_items if is_training else source.eval_items
            if not items:
                raise ValueError("the image folder {} has no {} images".format(
                    source.data_dir, "training" if is_training else "validation"))
        else:
            files = list(source.train_files if is_training else source.eval_files)
            if not files:
                raise ValueError("no {} files in {}".format(
                    "training" if is_training else "evaluation", source.data_dir))
    else:
        files = list_files(data_dir, pattern)

    start_position = int(start_position or 0) if is_training else 0
    if is_training:
        seed = _stream_seed(seed)
    if items is not None:
        dataset = _folder_elements(items, cfg, is_training, seed, num_shards, shard_index, start_position)
    else:
        dataset = _record_elements(files, cfg, is_training, seed, num_shards, shard_index, start_position)
    dataset = _decode_checked(dataset, cfg, image_size, is_training, seed, normalization, num_classes,
                              records=items is None, first_element=start_position)
    if not is_training and bool(getattr(cfg, "cache_eval", False)):
        dataset = dataset.cache()
    dataset = dataset.batch(batch_size, drop_remainder=bool(is_training))

    def static_shape(images, labels):
        # Static shapes: [B, S, S, 3] when training (drop_remainder), [None, S, S, 3] for evaluation.
        return tf.reshape(images, [batch_size if is_training else -1, image_size, image_size, 3]), labels

    dataset = dataset.map(static_shape)
    prefetch = int(getattr(cfg, "prefetch", -1))
    if prefetch != 0:
        dataset = dataset.prefetch(_autotune(prefetch))
    return _apply_options(dataset, cfg)


def _permutation(n, seed, epoch):
    """A permutation of range(n) that depends only on (seed, epoch): stateless, so a resumed run can
    rebuild any epoch's order without replaying the epochs before it."""
    noise = tf.random.stateless_uniform([n], seed=tf.stack([tf.constant(seed, tf.int64), epoch]))
    return tf.argsort(noise)


def _epochs(per_epoch, start_epoch, offset, skip=None):
    """per_epoch(epoch) for epoch = start_epoch, start_epoch + 1, ... without end; the first `offset`
    images of the first epoch are left out (they were consumed before a resume) by
    skip(dataset, count), default Dataset.skip."""
    def epoch_elements(epoch):
        dataset = per_epoch(epoch)
        if offset <= 0:
            return dataset
        count = tf.compat.v1.where(tf.equal(epoch, start_epoch), tf.constant(offset, tf.int64),
                                   tf.constant(0, tf.int64))
        return skip(dataset, count) if skip else dataset.skip(count)

    return tf.data.Dataset.range(int(start_epoch), 2 ** 62).flat_map(epoch_elements)


def _skip_records(dataset, count):
    """Leaves out the first `count` records of (path, index, payload, kind) elements, keeping the
    end-of-file and broken-file markers in between (they are not images)."""
    def number(seen, element):
        is_record = tf.equal(element[3], _RECORD)
        seen = seen + tf.cast(is_record, tf.int64)
        return seen, (tf.logical_and(is_record, seen <= count),) + tuple(element)

    dataset = _scan(dataset, tf.constant(0, tf.int64), number)
    dataset = dataset.filter(lambda skipped, *element: tf.logical_not(skipped))
    return dataset.map(lambda skipped, *element: tuple(element))


def _start(position, epoch_size):
    """(epoch, offset in it) of the element at stream position `position`."""
    position = int(position or 0)
    if position <= 0 or epoch_size <= 0:
        return 0, 0
    return position // epoch_size, position % epoch_size


def _record_elements(files, cfg, is_training, seed, num_shards, shard_index, start_position=0):
    """(path, index, payload, kind) for every record of the TFRecord files.

    Training: an endless stream of epochs; each epoch's file order and record shuffle depend only on
    (seed, epoch), so `start_position` (records this reader already delivered) resumes it exactly."""
    file_level = num_shards > 1 and len(files) >= num_shards
    record_level = num_shards > 1 and not file_level
    if file_level:
        files = files[shard_index::num_shards]
    sizes = [file_size(path) for path in files]
    cycle_length = max(1, min(int(getattr(cfg, "cycle_length", 8)), len(files)))
    buffer_bytes = int(float(getattr(cfg, "read_buffer_mb", _READ_BUFFER_MB)) * 1024 * 1024)
    files_t = tf.constant(files, tf.string)
    sizes_t = tf.constant(sizes, tf.int64)

    def records(file_dataset):
        dataset = file_dataset.interleave(lambda path, size: _read_checked(path, size, buffer_bytes),
                                          cycle_length=cycle_length, block_length=1,
                                          num_parallel_calls=_autotune(-1))
        if record_level:
            dataset = dataset.shard(num_shards, shard_index)
        return dataset

    if not is_training:
        return records(tf.data.Dataset.from_tensor_slices((files_t, sizes_t)))

    shuffle_buffer = int(getattr(cfg, "shuffle_buffer", 1024))
    seed = _stream_seed(seed)

    def epoch_records(epoch):
        order = _permutation(len(files), seed, epoch)
        dataset = records(tf.data.Dataset.from_tensor_slices((tf.gather(files_t, order),
                                                              tf.gather(sizes_t, order))))
        if shuffle_buffer > 1:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed)
        return dataset

    epoch, offset = 0, 0
    if start_position:
        total = count_records(files)
        epoch_size = total if not record_level else len(range(shard_index, total, num_shards))
        epoch, offset = _start(start_position, epoch_size)
        log.info("input resumes at epoch %d, record %d of %d", epoch, offset, epoch_size)
    return _epochs(epoch_records, epoch, offset, skip=_skip_records)


def _stream_seed(seed):
    """The training stream's seed: the run's seed, else one drawn now (that order is then not repeatable)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        log.info("input order seeded with %d (set seed= to make it repeatable)", seed)
    return int(seed)


def _folder_elements(items, cfg, is_training, seed, num_shards, shard_index, start_position=0):
    """(path, index=-1, payload="", label, kind=_FILE) for every image of the list (training: an endless
    stream of epochs, each in an order that depends only on (seed, epoch); see _record_elements)."""
    items = items[shard_index::num_shards] if num_shards > 1 else items
    paths = tf.constant([path for path, _ in items], tf.string)
    labels = tf.constant(np.asarray([label for _, label in items], np.int32))

    def element(path, label):
        return path, tf.constant(-1, tf.int64), tf.constant("", tf.string), label, tf.constant(_FILE, tf.int32)

    if not is_training:
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(element)
    seed = _stream_seed(seed)

    def epoch_items(epoch):
        # The list is small (paths): all of it is shuffled, every epoch.
        order = _permutation(len(items), seed, epoch)
        return tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(labels, order)))

    epoch, offset = _start(start_position, len(items))
    if start_position:
        log.info("input resumes at epoch %d, image %d of %d", epoch, offset, len(items))
    return _epochs(epoch_items, epoch, offset).map(element)


# The evaluation stream's terminal record: a 32x32 grey JPEG (tf.io.encode_jpeg, quality 50), decoded like any
# record and then dropped.
_TERMINAL_JPEG = codecs.decode(
    b"/9j/4AAQSkZJRgABAQEBLAEsAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERXRTc4UG1RV19iZ2hn"
    b"Pk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
    b"Y2P/wAARCAAgACADASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQID"
    b"AAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlq"
    b"c3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3"
    b"+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEI"
    b"FEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImK"
    b"kpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwAo"
    b"oooAKKKKACiiigAooooA/9k=", "base64")


def _terminal_record(cfg):
    """The serialized terminal record, under the dataset's image and label keys (its label is never checked)."""
    label = int(getattr(cfg, "label_offset", 0))
    return serialize_example(make_example(
        _TERMINAL_JPEG, label, height=32, width=32, image_key=getattr(cfg, "image_key", "image/encoded"),
        label_key=getattr(cfg, "label_key", "image/class/label")))


def _decode_checked(dataset, cfg, image_size, is_training, seed, normalization, num_classes, records,
                    first_element=0):
    """Elements -> (image [?, ?, 3] normalised, label), with bad records reported or skipped (see the
    module docstring). records: elements (path, index, payload, kind) of TFRecord files (the label is
    parsed from the payload); else (path, index, payload, label, kind) of image files.

    Training augmentation draws from the stateless seed (seed, image number), images numbered from
    first_element (a resumed stream's start_position): an image's crop and flip depend neither on the
    map's thread scheduling nor on whether the run was resumed."""
    skip = bool(getattr(cfg, "skip_bad_records", False))
    num_parallel_calls = _autotune(getattr(cfg, "num_parallel_calls", -1))

    def unpack(element):
        if records:
            path, index, payload, kind = element
            return path, index, payload, tf.constant(-1, tf.int32), kind
        return element

    if records:
        # A file read to its end has nothing to decode. (A broken file's marker stays: it fails in the map, and
        # so counts as a bad record.)
        dataset = dataset.filter(lambda path, index, payload, kind: tf.not_equal(kind, _END_OK))
    if not is_training:
        # Comes out of the map whatever happened before it: a bad last record is seen too. In TFRecords it is a
        # real (tiny) record, so that the map needs no tf.cond around the decoding: that cond costs more CPU per
        # image than everything else the checks add.
        if records:
            terminal = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(_terminal_record(cfg)),
                        tf.constant(_TERMINAL))
        else:
            terminal = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(""), tf.constant(-1),
                        tf.constant(_TERMINAL))
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(terminal))

    def number(state, element):
        seq, image_number, prev_path, prev_index, prev_kind = state
        path, index, payload, label, kind = unpack(element)
        is_image = tf.logical_or(tf.equal(kind, _RECORD), tf.equal(kind, _FILE))
        new_state = (seq + 1, image_number + tf.cast(is_image, tf.int64),
                     tf.concat([prev_path[1:], tf.reshape(path, [1])], 0),
                     tf.concat([prev_index[1:], tf.reshape(index, [1])], 0),
                     tf.concat([prev_kind[1:], tf.reshape(kind, [1])], 0))
        return new_state, (seq, image_number, prev_path, prev_index, prev_kind, path, index, payload, label,
                           kind)

    def real(image_number, path, payload, label, kind):
        # _BROKEN elements have nothing to decode: they fail, and so count as bad records.
        readable = tf.logical_or(tf.equal(kind, _RECORD if records else _FILE), tf.equal(kind, _TERMINAL))
        is_record = tf.debugging.Assert(readable, [BAD_RECORD_MARK])
        with tf.control_dependencies([is_record]):
            if records:
                image_bytes, label = parse_record(payload, cfg)
            else:
                image_bytes = tf.io.read_file(path)
        has_image = tf.debugging.Assert(tf.greater(tf.strings.length(image_bytes), 0), [BAD_RECORD_MARK])
        with tf.control_dependencies([has_image]):
            image_bytes = tf.identity(image_bytes)
        element_seed = tf.stack([tf.constant(seed, tf.int64), image_number]) if is_training else None
        image = preprocessing.preprocess_image(image_bytes, image_size, is_training, cfg=cfg,
                                               seed=element_seed)
        return preprocessing.normalize(image, normalization), label

    def decode(seq, image_number, prev_path, prev_index, prev_kind, path, index, payload, label, kind):
        if records:
            image, label = real(image_number, path, payload, label, kind)
        else:
            image, label = tf.cond(
                tf.equal(kind, _TERMINAL),
                lambda: (tf.zeros([0, 0, 3], tf.float32), tf.constant(-1, tf.int32)),
                lambda: real(image_number, path, payload, label, kind))
        return seq, prev_path, prev_index, prev_kind, path, index, kind, image, label

    def gaps(last_seq, element):
        seq = element[0]
        return seq, element + (seq - last_seq - 1,)

    counter = None
    if skip:
        counter = _SkipCounter(cfg)
        _SKIP_COUNTERS.setdefault(tf.compat.v1.get_default_graph(), []).append(counter)
    kind_names = tf.constant(list(_KIND_NAMES))

    def keep(seq, prev_path, prev_index, prev_kind, path, index, kind, image, label, missing):
        # missing > 0: that many elements just before this one were dropped: the last ones of prev_*.
        checks = []
        if counter is not None:
            def note():
                noted = tf.compat.v1.py_func(counter.note, [prev_kind, prev_index, prev_path, missing],
                                             tf.int64, stateful=True)
                with tf.control_dependencies([noted]):
                    return tf.constant(False)
            checks.append(tf.cond(tf.greater(missing, 0), note, lambda: tf.constant(False)))
        else:
            # Named: the first bad record of the run (or the oldest one remembered).
            first = _REMEMBERED - tf.cast(tf.minimum(tf.maximum(missing, 1), _REMEMBERED), tf.int32)
            checks.append(tf.debugging.Assert(tf.equal(missing, 0), [
                BAD_RECORD_MARK, tf.gather(kind_names, prev_kind[first]), prev_index[first],
                prev_path[first]]))
        is_image = tf.logical_or(tf.equal(kind, _RECORD), tf.equal(kind, _FILE))
        if num_classes > 0:
            in_range = tf.logical_and(tf.greater_equal(label, 0), tf.less(label, num_classes))
            checks.append(tf.debugging.Assert(tf.logical_or(tf.logical_not(is_image), in_range),
                                              [BAD_LABEL_MARK, label, index, path]))
        with tf.control_dependencies(checks):
            return tf.identity(is_image)

    start = (tf.constant(0, tf.int64), tf.constant(int(first_element), tf.int64),
             tf.constant([""] * _REMEMBERED), tf.constant([-1] * _REMEMBERED, tf.int64),
             tf.constant([_RECORD] * _REMEMBERED))
    dataset = _scan(dataset, start, number)
    dataset = _ignore_errors(_ordered_map(dataset, decode, num_parallel_calls))
    dataset = _scan(dataset, tf.constant(-1, tf.int64), gaps)
    dataset = dataset.filter(keep)
    return dataset.map(lambda seq, prev_path, prev_index, prev_kind, path, index, kind, image, label, missing:
                       (image, label))
