"""Bad data: truncated or corrupt TFRecord files, records without the image, undecodable images, labels
out of range. Default: one error naming the file and record; dataset.skip_bad_records: skipped and counted."""
import logging
import os

import pytest
import tensorflow as tf

from conftest import TINY, run_py
from effnet_exp.data import pipeline
from effnet_exp.data.config import DatasetConfig, Normalization
from effnet_exp.data.diagnostics import data_errors, skipped_records
from effnet_exp.data.records import make_example, serialize_example, write_tfrecord
from effnet_exp.data.source import DataSource, resolve_data_source
from effnet_exp.errors import UserError
from test_image_folder import COLOURS, image_bytes, image_pixels, make_class_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _good(i):
    pixels = image_pixels(30 + i, 40, COLOURS[i % 3], i)
    return image_bytes(pixels, "png" if i % 2 else "jpeg")


def _serialized(i, label=None, image=None, **kwargs):
    data = _good(i) if image is None else image
    return serialize_example(make_example(
        data, i % 3 if label is None else label, filename="img{}".format(i), **kwargs))


BAD_KINDS = {
    # name: (record index of the bad record, words the error must contain)
    "truncated": (3, "truncated or corrupt"),
    "crc": (1, "truncated or corrupt"),
    "no_image": (2, "no 'image/encoded' image bytes"),
    "bad_jpeg": (1, "JPEG image data cannot be decoded"),
    "not_example": (0, "not a serialized tf.train.Example"),
    "gif": (2, "GIF image data, not JPEG or PNG"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """validation-good (5 good records) and one validation-<kind> file per bad kind."""
    root = tmp_path_factory.mktemp("bad")
    files = {}

    def write(name, payloads):
        path = str(root / "validation-{}".format(name))
        write_tfrecord(path, payloads)
        files[name] = path
        return path

    write("good", [_serialized(i) for i in range(5)])
    path = write("truncated", [_serialized(i) for i in range(10, 14)])
    data = open(path, "rb").read()
    with open(path, "wb") as handle:  # cut inside record 3
        handle.write(data[:len(data) - 100])
    path = write("crc", [_serialized(i) for i in range(20, 23)])
    data = bytearray(open(path, "rb").read())
    first = 16 + len(_serialized(20))
    data[first + 12 + 50] ^= 0xFF  # a payload byte of record 1
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    no_image = tf.train.Example(features=tf.train.Features(feature={
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))}))
    write("no_image", [_serialized(30), _serialized(31), serialize_example(no_image),
                       _serialized(33)])
    write("bad_jpeg", [_serialized(40), _serialized(41, image=b"\xff\xd8\xff\xe0" + b"\x13" * 200),
                       _serialized(42)])
    write("not_example", [b"\x08\x96\x01 this is not an Example", _serialized(51)])
    write("gif", [_serialized(60), _serialized(61), _serialized(62, image=b"GIF89a" + b"\0" * 30)])
    return str(root), files


def _cfg(**overrides):
    base = dict(num_classes=3, shuffle_buffer=8, cycle_length=2, num_parallel_calls=2, prefetch=1,
                normalization=Normalization.unit)
    base.update(overrides)
    return DatasetConfig(**base)


def _build(source, cfg, batch_size, is_training, seed=None):
    return pipeline.build_dataset(source, cfg, is_training=is_training, batch_size=batch_size, image_size=32,
                                  normalization=cfg.normalization, seed=seed)


def _eval(cfg, files, batch_size=4):
    """(labels seen, skipped count) of one eval pass through build_dataset, inside data_errors."""
    source = DataSource(os.path.dirname(files[0]), [], list(files), None, None, None)
    graph = tf.Graph()
    with graph.as_default():
        dataset = _build(source, cfg, batch_size, is_training=False)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        labels = []
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            with data_errors(cfg):
                while True:
                    try:
                        labels.extend(sess.run(batch)[1].tolist())
                    except tf.errors.OutOfRangeError:
                        break
    return labels, skipped_records(graph)


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_record_stops_with_the_file_and_record(bad_files, kind):
    _, files = bad_files
    index, words = BAD_KINDS[kind]
    with pytest.raises(UserError) as info:
        _eval(_cfg(), [files["good"], files[kind]])
    message = str(info.value)
    assert "\n" not in message
    assert "record {} of {}".format(index, files[kind]) in message, message
    assert words in message and "dataset.skip_bad_records=true" in message


def test_skip_bad_records_counts_them(bad_files, caplog):
    _, files = bad_files
    ordered = [files[name] for name in sorted(files)]
    caplog.set_level(logging.WARNING, logger="effnet_exp.data.diagnostics")
    labels, skipped = _eval(_cfg(skip_bad_records=True), ordered)
    # One per bad kind; a CRC error or a truncation also ends the reading of its file.
    assert skipped == len(BAD_KINDS)
    good = {"good": 5, "truncated": 3, "crc": 1, "no_image": 3, "bad_jpeg": 2, "not_example": 1, "gif": 2}
    assert len(labels) == sum(good.values()) == 17
    logged = " ".join(r.getMessage() for r in caplog.records)
    for kind, (index, _) in BAD_KINDS.items():
        assert "record {} of {}".format(index, files[kind]) in logged


def test_a_long_run_of_bad_records_is_counted_exactly(tmp_path):
    path = str(tmp_path / "validation-run")
    broken = b"\xff\xd8\xff\xe0" + b"\x13" * 100
    write_tfrecord(path, [_serialized(i, image=broken) for i in range(6)] + [_serialized(6)])
    labels, skipped = _eval(_cfg(skip_bad_records=True, cycle_length=1), [path])
    assert skipped == 6 and labels == [0]
    with pytest.raises(UserError) as info:
        _eval(_cfg(cycle_length=1), [path])
    assert any("record {} of {}: its JPEG".format(i, path) in str(info.value) for i in range(6))
    # ... and at the very end of the evaluation set.
    last = str(tmp_path / "validation-last")
    write_tfrecord(last, [_serialized(0), _serialized(1, image=broken)])
    assert _eval(_cfg(skip_bad_records=True), [last]) == ([0], 1)
    with pytest.raises(UserError, match="record 1 of {}: its JPEG".format(last)):
        _eval(_cfg(), [last])
    # Other image/label keys and a label offset: the evaluation's terminal record (a tiny image under the same
    # keys, decoded like the others) still follows the bad last record, and is never counted or checked.
    keys = dict(image_key="image", label_key="label", label_offset=1)
    other = str(tmp_path / "validation-keys")
    write_tfrecord(other, [make_example(image, i + 1, image_key="image", label_key="label")
                                    for i, image in enumerate([_good(0), _good(1), broken])])
    assert _eval(_cfg(skip_bad_records=True, **keys), [other]) == ([0, 1], 1)
    with pytest.raises(UserError, match="record 2 of {}: its JPEG".format(other)):
        _eval(_cfg(**keys), [other])


def test_skip_bad_records_while_training(bad_files):
    _, files = bad_files
    source = DataSource(os.path.dirname(files["good"]), [files["good"], files["bad_jpeg"], files["gif"]],
                        [], None, None, None)
    graph = tf.Graph()
    with graph.as_default():
        dataset = _build(source, _cfg(skip_bad_records=True), 4, is_training=True, seed=1)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        images, labels = iterator.get_next()
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            for _ in range(8):  # 3 epochs of 8 good records
                assert sess.run(labels).shape == (4,)
    assert skipped_records(graph) >= 4  # 2 bad records per epoch


def test_label_out_of_range_always_stops(bad_files, tmp_path):
    path = str(tmp_path / "validation-labels")
    write_tfrecord(path, [_serialized(0), _serialized(1, label=7)])
    for skip in (False, True):
        with pytest.raises(UserError) as info:
            _eval(_cfg(skip_bad_records=skip, label_offset=1), [path])
        assert "record 0 of {}: label -1".format(path) in str(info.value)
    with pytest.raises(UserError) as info:
        _eval(_cfg(skip_bad_records=True), [path])
    assert "record 1 of {}: label 7 (stored 7 minus dataset.label_offset=0) is outside [0, 3)".format(
        path) in str(info.value)
    # Before training starts: the precheck of resolve_data_source.
    with pytest.raises(UserError) as info:
        resolve_data_source(DatasetConfig(data_dir=str(tmp_path), num_classes=3, train_pattern="validation-*"))
    assert "record 1 of {}: label 7".format(path) in str(info.value)


def test_precheck_names_bad_records_before_training(bad_files, caplog):
    root, files = bad_files
    for kind in ("truncated", "crc", "no_image", "not_example", "gif"):
        cfg = DatasetConfig(data_dir=root, num_classes=3, train_pattern="validation-good",
                            eval_pattern="validation-" + kind)
        with pytest.raises(UserError) as info:
            resolve_data_source(cfg)
        assert "record {} of {}".format(BAD_KINDS[kind][0], files[kind]) in str(info.value)
    # Undecodable image data passes the precheck (it does not decode) and is caught while reading.
    cfg = DatasetConfig(data_dir=root, num_classes=3, eval_pattern="validation-bad_jpeg",
                        train_pattern="validation-good")
    assert resolve_data_source(cfg).num_eval == 3
    caplog.set_level(logging.WARNING, logger="effnet_exp.data.source")
    cfg = DatasetConfig(data_dir=root, num_classes=3, train_pattern="validation-good",
                        eval_pattern="validation-*", skip_bad_records=True)
    source = resolve_data_source(cfg)
    # Records, the bad ones included: what an eval pass sees plus what it skips (17 + 6).
    assert source.num_train == 5 and source.num_eval == 17 + 6
    assert "record 2 of {}".format(files["gif"]) in caplog.text
    # Too big to precheck: counted from the headers, problems left to the pipeline.
    cfg = DatasetConfig(data_dir=root, num_classes=3, eval_pattern="validation-gif", precheck_max_mb=0,
                        train_pattern="validation-good")
    assert resolve_data_source(cfg).num_eval == 3


def test_bad_image_in_a_folder(tmp_path):
    make_class_folder(tmp_path, {"a": 3, "b": 3})
    bad = tmp_path / "b" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    missing = tmp_path / "a" / "zz_gone.png"
    missing.write_bytes(b"")
    cfg = _cfg(root=str(tmp_path), num_classes=0, val_fraction=0.0)
    source = resolve_data_source(cfg, need_eval=False)
    source = source._replace(eval_items=source.train_items, eval_files=source.train_files)
    with pytest.raises(UserError) as info:
        _eval_folder(cfg, source)
    assert "bad image {}: ".format(missing) in str(info.value) or \
        "bad image {}: ".format(bad) in str(info.value)
    labels, skipped = _eval_folder(_cfg(root=str(tmp_path), num_classes=0, skip_bad_records=True), source)
    assert skipped == 2 and len(labels) == 6


def _eval_folder(cfg, source):
    graph = tf.Graph()
    with graph.as_default():
        dataset = _build(source, cfg, 4, is_training=False)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        labels = []
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            with data_errors(cfg):
                while True:
                    try:
                        labels.extend(sess.run(batch)[1].tolist())
                    except tf.errors.OutOfRangeError:
                        break
    return labels, skipped_records(graph)


def test_run_py_stops_on_a_bad_image_with_one_line(tmp_path, cache_dir):
    # (test_image_folder's run.py test covers dataset.skip_bad_records=true and eval.json.)
    root = tmp_path / "data"
    make_class_folder(root, {"a": 4, "b": 4})
    bad = root / "b" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    proc = run_py(TINY + ["dataset=image_folder", "dataset.root=" + str(root), "dataset.val_fraction=0",
                          "mode=train", "hydra.run.dir=" + str(tmp_path / "stop")], tmp_path, cache_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: bad image {}: its JPEG data cannot be decoded".format(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
