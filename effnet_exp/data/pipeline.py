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
index; wrap the session loop in diagnostics.data_errors(cfg) to turn it into one UserError line with the
precise reason) or, with `skip_bad_records`, is dropped, logged and counted (diagnostics.skipped_records).
"""
import codecs
import logging
import os

import numpy as np
import tensorflow as tf

from effnet_exp.data import preprocessing
from effnet_exp.data.config import AugmentPolicy, Normalization
from effnet_exp.data.diagnostics import (BAD_LABEL_MARK, BAD_RECORD_MARK, BROKEN, END_OK, FILE, KIND_NAMES, RECORD,
                                         TERMINAL, new_skip_counter)
from effnet_exp.data.records import RECORD_OVERHEAD, count_records, file_size, make_example, serialize_example

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.experimental.AUTOTUNE

_TF1 = tf.__version__.startswith("1.")

# Each element carries the names of this many elements before it: a run of up to this many bad
# records in a row is named record by record (longer runs are counted, and their last ones named).
_REMEMBERED = 4


def _autotune(value):
    value = int(value)
    return AUTOTUNE if value < 0 else value


def parse_record(serialized, cfg):
    """Parse one serialized tf.train.Example -> (image_bytes string, label int32 scalar).

    Keys come from the DatasetConfig's image_key / label_key; the label may be stored as a single int64
    (scalar or shape [1], which is the same thing in an Example) and cfg.label_offset is subtracted.
    A missing image key gives empty image bytes; a missing label fails.
    """
    features = {
        cfg.image_key: tf.io.FixedLenFeature([], tf.string, default_value=""),
        # A single int64 value; parsing as [1] then reshaping accepts both spellings.
        cfg.label_key: tf.io.FixedLenFeature([1], tf.int64),
    }
    parsed = tf.io.parse_single_example(serialized, features)
    image_bytes = parsed[cfg.image_key]
    label = tf.reshape(parsed[cfg.label_key], [])
    label = tf.cast(label, tf.int32) - int(cfg.label_offset)
    return image_bytes, label


def _ignore_errors(dataset):
    if hasattr(dataset, "ignore_errors"):
        return dataset.ignore_errors()
    return dataset.apply(tf.data.experimental.ignore_errors())


def _plain(fn):
    """fn for tf.data as it is written: plain graph code, its control flow tf.cond / tf.switch_case. AutoGraph's
    conversion (tf.data's default) of it and of everything it calls took most of a training pipeline's build:
    about 18 s of 20 on TF 1.15, 7 s of 8.5 on TF 2.21."""
    return tf.autograph.experimental.do_not_convert(fn)


def _scan(dataset, initial_state, fn):
    fn = _plain(fn)
    if hasattr(dataset, "scan"):
        return dataset.scan(initial_state, fn)
    return dataset.apply(tf.data.experimental.scan(initial_state, fn))


def _ordered_map(dataset, fn, num_parallel_calls):
    fn = _plain(fn)
    if _TF1:
        return dataset.map(fn, num_parallel_calls=num_parallel_calls)
    return dataset.map(fn, num_parallel_calls=num_parallel_calls, deterministic=True)


def _where(condition, x, y):
    return tf.compat.v1.where(condition, x, y)


def _read_checked(path, size, buffer_bytes):
    """Records of one TFRecord file as (path, index, payload, kind): kind RECORD for each record, then
    one END_OK element if the file was read to its end, else one BROKEN element whose index is the
    first record that could not be read."""
    records = _ignore_errors(tf.data.TFRecordDataset(path, buffer_size=buffer_bytes))
    indexed = tf.data.Dataset.zip((tf.data.Dataset.range(2 ** 62), records))
    end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant("", tf.string)))

    def step(state, element):
        consumed, count = state
        index, payload = element
        at_end = tf.less(index, 0)
        length = tf.cast(tf.strings.length(payload), tf.int64) + RECORD_OVERHEAD
        kind = _where(at_end, _where(tf.equal(consumed, size), END_OK, BROKEN), RECORD)
        new_state = (_where(at_end, consumed, consumed + length),
                     _where(at_end, count, count + 1))
        return new_state, (path, _where(at_end, count, index), payload, kind)

    zero = tf.constant(0, tf.int64)
    return _scan(indexed.concatenate(end), (zero, zero), step)


def _apply_options(dataset, cfg):
    options = tf.data.Options()
    # Always ordered: the bad-record probes rely on it (and runs are reproducible).
    if hasattr(options, "deterministic"):  # TF >= 2.5
        options.deterministic = True
    else:  # TF 1.15
        options.experimental_deterministic = True
    threading_options = options.threading if hasattr(options, "threading") else options.experimental_threading
    if cfg.private_threadpool_size > 0:
        threading_options.private_threadpool_size = cfg.private_threadpool_size
    if cfg.max_intra_op_parallelism > 0:
        threading_options.max_intra_op_parallelism = cfg.max_intra_op_parallelism
    # TF 1.15 bug: with the autotuning model on, closing a session while a parallel interleave still has
    # elements in flight can segfault (its worker thread destroys an iterator after the model is gone:
    # Model::RemoveNode). AUTOTUNE parallelism still starts at the thread-pool size and prefetch(AUTOTUNE)
    # keeps its own buffer tuner.
    autotune = bool(cfg.autotune) and not _TF1
    if hasattr(options, "autotune") and hasattr(options.autotune, "enabled"):
        options.autotune.enabled = autotune
    else:
        options.experimental_optimization.autotune = autotune
    return dataset.with_options(options)


def build_dataset(source, ds_cfg, *, is_training, batch_size, image_size, normalization, seed=None,
                  start_position=0, num_shards=1, shard_index=0, with_sources=False):
    """tf.data.Dataset of (images float32 [B, S, S, 3] normalised, labels int32 [B]); with_sources, of (images,
    labels, sources string [B]): where each image came from, its file path (an image folder) or
    "<TFRecord file>:<record index in it>".

    source: the DataSource that `resolve_data_source` returned; is_training picks its train or eval
    files (or its (path, label) lists for an image folder). ds_cfg: the DatasetConfig (augmentation,
    record keys, tf.data knobs, bad records); normalization: the Normalization the model expects.
    Labels are checked against source.num_classes (else ds_cfg.num_classes; 0: not checked).

    Training: file-level sharding when there are at least num_shards files (else record-level), then
    endless epochs, each with its own file order, parallel interleave and record shuffle (serialized
    records, bounded by ds_cfg.shuffle_buffer), all depending only on (seed, epoch); parallel map,
    batch(drop_remainder=True), prefetch. start_position: records (or images) this reader delivered
    before a resume; the stream continues right after them, as if it had never stopped.
    Evaluation: no shuffle or repeat, every good record exactly once, batch(drop_remainder=False).
    Output order is deterministic. Bad records stop the iterator with an error naming the file and
    record (see diagnostics.data_errors) or, with ds_cfg.skip_bad_records, are skipped and counted.
    """
    image_size = int(image_size)
    batch_size = int(batch_size)
    num_shards = int(num_shards)
    shard_index = int(shard_index)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError("invalid sharding: shard_index {} of num_shards {}".format(
            shard_index, num_shards))
    normalization = Normalization(normalization)  # fail here, not inside the map function
    num_classes = int(source.num_classes or ds_cfg.num_classes)
    records = source.kind != "folder"
    listed = _listed(source, is_training, records)
    start_position = int(start_position or 0) if is_training else 0
    if is_training:
        seed = _stream_seed(seed)
        _log_policy(ds_cfg, image_size)
    if records:
        dataset = _record_elements(listed, ds_cfg, is_training, seed, num_shards, shard_index, start_position)
    else:
        dataset = _folder_elements(listed, is_training, seed, num_shards, shard_index, start_position)
    dataset = _decode_checked(dataset, ds_cfg, image_size, is_training, seed, normalization, num_classes,
                              records=records, first_element=start_position, with_sources=with_sources)
    if not is_training and ds_cfg.cache_eval:
        dataset = dataset.cache()
    dataset = dataset.batch(batch_size, drop_remainder=bool(is_training))

    def static_shape(images, labels, *sources):
        # Static shapes: [B, S, S, 3] when training (drop_remainder), [None, S, S, 3] for evaluation.
        images = tf.reshape(images, [batch_size if is_training else -1, image_size, image_size, 3])
        return (images, labels) + sources

    dataset = dataset.map(_plain(static_shape))
    if ds_cfg.prefetch != 0:
        dataset = dataset.prefetch(_autotune(ds_cfg.prefetch))
    return _apply_options(dataset, ds_cfg)


def _listed(source, is_training, records):
    """The source's TFRecord files (records) or (path, label) images for this split; ValueError if none."""
    what = "training" if is_training else ("evaluation" if records else "validation")
    if records:
        files = list(source.train_files if is_training else source.eval_files)
        if not files:
            raise ValueError("no {} files in {}".format(what, source.data_dir))
        return files
    items = source.train_items if is_training else source.eval_items
    if not items:
        raise ValueError("the image folder {} has no {} images".format(source.data_dir, what))
    return items


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

    return tf.data.Dataset.range(int(start_epoch), 2 ** 62).flat_map(_plain(epoch_elements))


def _skip_records(dataset, count):
    """Leaves out the first `count` records of (path, index, payload, kind) elements, keeping the
    end-of-file and broken-file markers in between (they are not images)."""
    def number(seen, element):
        is_record = tf.equal(element[3], RECORD)
        seen = seen + tf.cast(is_record, tf.int64)
        return seen, (tf.logical_and(is_record, seen <= count),) + tuple(element)

    dataset = _scan(dataset, tf.constant(0, tf.int64), number)
    dataset = dataset.filter(_plain(lambda skipped, *element: tf.logical_not(skipped)))
    return dataset.map(_plain(lambda skipped, *element: tuple(element)))


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
    cycle_length = max(1, min(int(cfg.cycle_length), len(files)))
    buffer_bytes = int(float(cfg.read_buffer_mb) * 1024 * 1024)
    files_t = tf.constant(files, tf.string)
    sizes_t = tf.constant(sizes, tf.int64)

    def records(file_dataset):
        dataset = file_dataset.interleave(_plain(lambda path, size: _read_checked(path, size, buffer_bytes)),
                                          cycle_length=cycle_length, block_length=1,
                                          num_parallel_calls=_autotune(-1))
        if record_level:
            dataset = dataset.shard(num_shards, shard_index)
        return dataset

    if not is_training:
        return records(tf.data.Dataset.from_tensor_slices((files_t, sizes_t)))

    shuffle_buffer = int(cfg.shuffle_buffer)
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


def _log_policy(cfg, image_size):
    policy = AugmentPolicy(cfg.augment)
    if policy == AugmentPolicy.randaugment:
        log.info("training images augmented by randaugment: %d ops per image at magnitude %g "
                 "(pixel constants x %d/224)", cfg.randaugment.num_layers, cfg.randaugment.magnitude, image_size)
    elif policy == AugmentPolicy.autoaugment:
        log.info("training images augmented by autoaugment (policy v0; pixel constants x %d/224)", image_size)


def _stream_seed(seed):
    """The training stream's seed: the run's seed, else one drawn now (that order is then not repeatable)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
        log.info("input order seeded with %d (set seed= to make it repeatable)", seed)
    return int(seed)


def _folder_elements(items, is_training, seed, num_shards, shard_index, start_position=0):
    """(path, index=-1, payload="", label, kind=FILE) for every image of the list (training: an endless
    stream of epochs, each in an order that depends only on (seed, epoch); see _record_elements)."""
    items = items[shard_index::num_shards] if num_shards > 1 else items
    paths = tf.constant([path for path, _ in items], tf.string)
    labels = tf.constant(np.asarray([label for _, label in items], np.int32))

    def element(path, label):
        return path, tf.constant(-1, tf.int64), tf.constant("", tf.string), label, tf.constant(FILE, tf.int32)

    if not is_training:
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(_plain(element))
    seed = _stream_seed(seed)

    def epoch_items(epoch):
        # The list is small (paths): all of it is shuffled, every epoch.
        order = _permutation(len(items), seed, epoch)
        return tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(labels, order)))

    epoch, offset = _start(start_position, len(items))
    if start_position:
        log.info("input resumes at epoch %d, image %d of %d", epoch, offset, len(items))
    return _epochs(epoch_items, epoch, offset).map(_plain(element))


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
    return serialize_example(make_example(_TERMINAL_JPEG, cfg.label_offset, height=32, width=32,
                                          image_key=cfg.image_key, label_key=cfg.label_key))


def _decode_checked(dataset, cfg, image_size, is_training, seed, normalization, num_classes, records,
                    first_element=0, with_sources=False):
    """Elements -> (image [?, ?, 3] normalised, label), with bad records reported or skipped (see the
    module docstring); with_sources -> (image, label, source) (see build_dataset). records: elements (path,
    index, payload, kind) of TFRecord files (the label is parsed from the payload); else (path, index, payload,
    label, kind) of image files.

    Training augmentation draws from the stateless seed (seed, image number), images numbered from
    first_element (a resumed stream's start_position): an image's crop and flip depend neither on the
    map's thread scheduling nor on whether the run was resumed."""
    num_parallel_calls = _autotune(cfg.num_parallel_calls)

    def unpack(element):
        if records:
            path, index, payload, kind = element
            return path, index, payload, tf.constant(-1, tf.int32), kind
        return element

    if records:
        # A file read to its end has nothing to decode. (A broken file's marker stays: it fails in the map, and
        # so counts as a bad record.)
        dataset = dataset.filter(_plain(lambda path, index, payload, kind: tf.not_equal(kind, END_OK)))
    if not is_training:
        # Comes out of the map whatever happened before it: a bad last record is seen too. In TFRecords it is a
        # real (tiny) record, so that the map needs no tf.cond around the decoding: that cond costs more CPU per
        # image than everything else the checks add.
        if records:
            terminal = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(_terminal_record(cfg)),
                        tf.constant(TERMINAL))
        else:
            terminal = (tf.constant(""), tf.constant(-1, tf.int64), tf.constant(""), tf.constant(-1),
                        tf.constant(TERMINAL))
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(terminal))

    def number(state, element):
        seq, image_number, prev_path, prev_index, prev_kind = state
        path, index, payload, label, kind = unpack(element)
        is_image = tf.logical_or(tf.equal(kind, RECORD), tf.equal(kind, FILE))
        new_state = (seq + 1, image_number + tf.cast(is_image, tf.int64),
                     tf.concat([prev_path[1:], tf.reshape(path, [1])], 0),
                     tf.concat([prev_index[1:], tf.reshape(index, [1])], 0),
                     tf.concat([prev_kind[1:], tf.reshape(kind, [1])], 0))
        return new_state, (seq, image_number, prev_path, prev_index, prev_kind, path, index, payload, label,
                           kind)

    def real(image_number, path, payload, label, kind):
        # BROKEN elements have nothing to decode: they fail, and so count as bad records.
        readable = tf.logical_or(tf.equal(kind, RECORD if records else FILE), tf.equal(kind, TERMINAL))
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
                tf.equal(kind, TERMINAL),
                lambda: (tf.zeros([0, 0, 3], tf.float32), tf.constant(-1, tf.int32)),
                lambda: real(image_number, path, payload, label, kind))
        return seq, prev_path, prev_index, prev_kind, path, index, kind, image, label

    def gaps(last_seq, element):
        seq = element[0]
        return seq, element + (seq - last_seq - 1,)

    counter = new_skip_counter(cfg) if cfg.skip_bad_records else None
    kind_names = tf.constant(list(KIND_NAMES))

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
        is_image = tf.logical_or(tf.equal(kind, RECORD), tf.equal(kind, FILE))
        if num_classes > 0:
            in_range = tf.logical_and(tf.greater_equal(label, 0), tf.less(label, num_classes))
            checks.append(tf.debugging.Assert(tf.logical_or(tf.logical_not(is_image), in_range),
                                              [BAD_LABEL_MARK, label, index, path]))
        with tf.control_dependencies(checks):
            return tf.identity(is_image)

    start = (tf.constant(0, tf.int64), tf.constant(int(first_element), tf.int64),
             tf.constant([""] * _REMEMBERED), tf.constant([-1] * _REMEMBERED, tf.int64),
             tf.constant([RECORD] * _REMEMBERED))
    dataset = _scan(dataset, start, number)
    dataset = _ignore_errors(_ordered_map(dataset, decode, num_parallel_calls))
    dataset = _scan(dataset, tf.constant(-1, tf.int64), gaps)
    dataset = dataset.filter(_plain(keep))

    def output(seq, prev_path, prev_index, prev_kind, path, index, kind, image, label, missing):
        if not with_sources:
            return image, label
        source = tf.strings.join([path, tf.strings.as_string(index)], separator=":") if records else path
        return image, label, source

    return dataset.map(_plain(output))
