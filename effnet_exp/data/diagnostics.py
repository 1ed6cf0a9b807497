"""Naming a bad record: the marks the input pipeline's checks put in their errors, the one line that turns such
an error into (`data_errors`), and the count of records skipped with dataset.skip_bad_records
(`skipped_records`)."""
import codecs
import contextlib
import logging
import re
import threading
import weakref

import numpy as np
import tensorflow as tf

from effnet_exp.data.folder import image_problem, sniff_image_format
from effnet_exp.data.preprocessing import UNSUPPORTED_FORMAT_MESSAGE
from effnet_exp.data.records import image_data, inspect_payload, read_record
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)

# What an element of the pipeline's checked stage stands for (KIND_NAMES: how messages call them).
RECORD, FILE, BROKEN, END_OK, TERMINAL = 0, 1, 2, 3, 4
KIND_NAMES = ("record", "file", "broken", "end", "terminal")

BAD_RECORD_MARK = "EFFNET_EXP_BAD_RECORD"
BAD_LABEL_MARK = "EFFNET_EXP_BAD_LABEL"
_BAD_RECORD_RE = re.compile(r"\[" + BAD_RECORD_MARK + r"\] \[(\w+)\] \[(-?\d+)\] \[(.*)\]")
_BAD_LABEL_RE = re.compile(r"\[" + BAD_LABEL_MARK + r"\] \[(-?\d+)\] \[(-?\d+)\] \[(.*)\]")
SKIP_HINT = "set dataset.skip_bad_records=true to skip and count bad records"
# Skipped records logged one by one; further ones are only counted.
_LOG_FIRST_SKIPS = 20


def _describe_file(path):
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (IOError, OSError) as err:
        return "cannot be read ({})".format(err.strerror or err)
    problem = image_problem(data)
    if problem:
        return problem
    fmt = sniff_image_format(data)
    if fmt not in ("jpeg", "png"):
        return "is not a JPEG or PNG image ({})".format(
            "it is {} data".format(fmt.upper()) if fmt else "unrecognised data")
    return "its {} data cannot be decoded (corrupt or truncated)".format(fmt.upper())


def describe_bad_record(kind, path, index, cfg):
    """One line naming a bad record and what is wrong with it (re-reads it in Python to say what).

    kind: one of KIND_NAMES; cfg: the DatasetConfig the record was read with."""
    if kind == "file":
        return "bad image {}: {}".format(path, _describe_file(path))
    where = "record {} of {}".format(index, path)
    if kind == "broken" and index == 0:
        return "{} is not a TFRecord file, or is corrupt from its first record on (nothing in it can be " \
               "read)".format(path)
    if kind == "broken":
        return "{}: the TFRecord data is truncated or corrupt from this record on (it and the rest of " \
               "the file cannot be read)".format(where)
    try:
        payload = read_record(path, index)
    except (tf.errors.OpError, IndexError, IOError, OSError) as err:
        return "{}: cannot be read again ({})".format(where, getattr(err, "message", None) or err)
    _, problem = inspect_payload(payload, cfg)
    if problem is None:
        fmt = sniff_image_format(image_data(payload, cfg.image_key))
        problem = "its {} image data cannot be decoded (corrupt or truncated)".format(fmt.upper())
    return "{}: {}".format(where, problem)


def label_message(index, path, label, cfg, num_classes):
    """One line for a record whose label (after dataset.label_offset) is outside [0, num_classes)."""
    return "record {} of {}: label {} (stored {} minus dataset.label_offset={}) is outside [0, {}); " \
           "check dataset.num_classes and dataset.label_offset".format(
               index, path, label, label + int(cfg.label_offset), cfg.label_offset, num_classes)


def _unescape(text):
    """Undo the C escaping TensorFlow applies to strings printed in assertion messages."""
    try:
        return codecs.escape_decode(text.encode("utf-8"))[0].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return text


def bad_data_message(err, cfg=None):
    """One line for an error raised by bad data, or None for other errors.

    cfg: the DatasetConfig of the build_dataset pipeline that raised it; None for graphs without one
    (prediction on image files), where only the unsupported image format is recognised."""
    message = getattr(err, "message", None) or str(err)
    found = _BAD_RECORD_RE.search(message) if cfg is not None else None
    if found:
        kind, index, path = found.group(1), int(found.group(2)), _unescape(found.group(3))
        return "{} ({})".format(describe_bad_record(kind, path, index, cfg), SKIP_HINT)
    found = _BAD_LABEL_RE.search(message) if cfg is not None else None
    if found:
        label, index, path = int(found.group(1)), int(found.group(2)), _unescape(found.group(3))
        return label_message(index, path, label, cfg, cfg.num_classes)
    if UNSUPPORTED_FORMAT_MESSAGE in message:
        return UNSUPPORTED_FORMAT_MESSAGE
    return None


@contextlib.contextmanager
def data_errors(cfg):
    """Turn a bad-record error of a build_dataset pipeline built with the DatasetConfig cfg into one
    UserError line naming the file and record (other errors pass through). Wrap the session loop that
    pulls from the dataset in it."""
    try:
        yield
    except tf.errors.OpError as err:
        message = bad_data_message(err, cfg)
        if message is None:
            raise
        raise UserError(message) from None


class SkipCounter(object):
    """Counts and logs the bad records one pipeline skipped; `note` is called from its graph (py_func)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.count = 0
        self._lock = threading.Lock()

    def note(self, kinds, indices, paths, missing):
        """`missing` bad records in a row were skipped; the last of them are the last of kinds, indices,
        paths (the elements remembered before the next good one). Returns the count so far."""
        missing = int(missing)
        with self._lock:
            self.count += missing
            count = self.count
        if count - missing < _LOG_FIRST_SKIPS:
            self._log(kinds, indices, paths, missing)
            if count >= _LOG_FIRST_SKIPS:
                log.warning("further bad records are skipped and counted without a log line each")
        return np.int64(count)

    def _log(self, kinds, indices, paths, missing):
        named = min(missing, len(paths))
        if missing > named:
            log.warning("skipped %d bad records in a row; the last %d:", missing, named)
        for kind, index, path in list(zip(kinds, indices, paths))[len(paths) - named:]:
            kind = KIND_NAMES[int(kind)]
            path = path.decode("utf-8", "replace") if isinstance(path, bytes) else str(path)
            try:
                what = describe_bad_record(kind, path, int(index), self.cfg)
            except Exception as err:  # the log line must not break the pipeline
                what = "{} {} of {} ({})".format(kind, int(index), path, err)
            log.warning("skipped %s", what)


_COUNTERS = weakref.WeakKeyDictionary()  # graph -> [SkipCounter]


def new_skip_counter(cfg):
    """A SkipCounter for a pipeline built in the default graph, counted by skipped_records(graph)."""
    counter = SkipCounter(cfg)
    _COUNTERS.setdefault(tf.compat.v1.get_default_graph(), []).append(counter)
    return counter


def skipped_records(graph=None):
    """How many bad records the datasets built in graph (default: the default graph) have skipped so far
    (dataset.skip_bad_records=true). A training epoch that meets a bad record counts it every time."""
    graph = graph if graph is not None else tf.compat.v1.get_default_graph()
    return sum(counter.count for counter in _COUNTERS.get(graph, ()))
