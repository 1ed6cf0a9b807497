"""Tests for effnet_exp.data: TFRecord parsing, preprocessing, tf.data pipeline, bundled digits."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from effnet_exp.data import bundled, pipeline, preprocessing
from effnet_exp.data.config import Builtin, DatasetConfig, Normalization, check_dataset
from effnet_exp.data.records import count_records, list_files, make_example, write_tfrecord
from effnet_exp.data.source import DataSource, resolve_data_source
from effnet_exp.errors import UserError
from factory import section

# (height, width) of the synthetic JPEGs: square, landscape, portrait, odd sizes.
SIZES = [(40, 40), (48, 64), (64, 36), (35, 50), (100, 80), (32, 32), (57, 41)]
EVAL_SIZE = 24  # 24 / (24 + 32) is not a short binary fraction: exercises the float32 crop maths
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


# --------------------------------------------------------------------------- helpers


def _pattern(height, width, seed):
    y, x = np.mgrid[0:height, 0:width]
    red = (x * 255.0 / max(width - 1, 1))
    green = (y * 255.0 / max(height - 1, 1))
    blue = (((x // 4 + y // 4 + seed) % 2) * 200.0 + 20.0)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def _encode_jpegs(images):
    graph = tf.Graph()
    with graph.as_default():
        placeholder = tf.compat.v1.placeholder(tf.uint8, [None, None, 3])
        encoded = tf.image.encode_jpeg(placeholder, format="rgb", quality=95)
        with tf.compat.v1.Session(graph=graph) as sess:
            return [sess.run(encoded, {placeholder: image}) for image in images]


def _collect(build, max_batches=None, graph_seed=None):
    """Build a dataset in a fresh graph and read it through a one-shot iterator."""
    batches = []
    with tf.Graph().as_default():
        if graph_seed is not None:
            tf.compat.v1.set_random_seed(graph_seed)
        dataset = build()
        next_batch = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        with tf.compat.v1.Session() as sess:
            while max_batches is None or len(batches) < max_batches:
                try:
                    batches.append(sess.run(next_batch))
                except tf.errors.OutOfRangeError:
                    break
    return batches


def _run_graph(fn):
    with tf.Graph().as_default():
        outputs = fn()
        with tf.compat.v1.Session() as sess:
            return sess.run(outputs)


def _cfg(**overrides):
    base = dict(shuffle_buffer=16, cycle_length=2, num_parallel_calls=2, prefetch=1)
    base.update(overrides)
    return DatasetConfig(**base)


def _build(cfg, folder, pattern, batch_size, image_size, is_training, **kwargs):
    """build_dataset over the files of folder matching pattern (as train or eval files)."""
    files = list_files(folder, pattern)
    source = DataSource(folder, files, files, None, None, None)
    kwargs.setdefault("normalization", cfg.normalization)
    return pipeline.build_dataset(source, cfg, is_training=is_training, batch_size=batch_size,
                                  image_size=image_size, **kwargs)


def _reference_eval(image_bytes, size, crop_padding=32):
    """The reference EfficientNet eval preprocessing, composed directly from TF ops."""
    shape = tf.image.extract_jpeg_shape(image_bytes)
    height, width = shape[0], shape[1]
    crop = tf.cast((size / (size + crop_padding)) * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    offset_h = ((height - crop) + 1) // 2
    offset_w = ((width - crop) + 1) // 2
    image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([offset_h, offset_w, crop, crop]),
                                          channels=3)
    return tf.compat.v1.image.resize_bicubic([image], [size, size])[0]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """7 JPEG records (labels stored 1..7) in two Slim-format files, plus an image/label-key file."""
    root = tmp_path_factory.mktemp("records")
    images = [_pattern(h, w, i) for i, (h, w) in enumerate(SIZES)]
    jpegs = _encode_jpegs(images)
    labels = list(range(1, len(jpegs) + 1))

    def examples(indices, **keys):
        return [make_example(jpegs[i], labels[i], height=SIZES[i][0], width=SIZES[i][1],
                             text="class{}".format(labels[i]), filename="img{}.jpg".format(i), **keys)
                for i in indices]

    slim = root / "slim"
    slim.mkdir()
    write_tfrecord(str(slim / "train-00000-of-00002"), examples([0, 1, 2, 3]))
    write_tfrecord(str(slim / "train-00001-of-00002"), examples([4, 5, 6]))
    write_tfrecord(str(slim / "validation-00000-of-00002"), examples([0, 1, 2, 3]))
    write_tfrecord(str(slim / "validation-00001-of-00002"), examples([4, 5, 6]))
    ascend = root / "ascend"
    ascend.mkdir()
    write_tfrecord(str(ascend / "data.tfrecord"),
                            examples(range(len(jpegs)), image_key="image", label_key="label"))
    return {"slim": str(slim), "ascend": str(ascend), "jpegs": jpegs, "labels": labels}


# --------------------------------------------------------------------------- files and records


def test_config_import_does_not_import_tensorflow():
    code = "import sys, effnet_exp.data.config; sys.exit('tensorflow' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.call([sys.executable, "-c", code], cwd=root) == 0


def test_check_dataset_names_the_key_and_value():
    check_dataset(DatasetConfig())
    digits = section("dataset", "dataset=digits")
    assert digits.builtin == Builtin.digits and digits.normalization == Normalization.imagenet
    check_dataset(digits)
    check_dataset(section("dataset", "dataset=imagenet", "dataset.data_dir=/data"))
    for key, value in (("val_fraction", 1.0), ("val_fraction", -0.1), ("num_classes", -1), ("shuffle_buffer", -1),
                       ("cycle_length", 0), ("read_buffer_mb", 0.0), ("num_parallel_calls", 0), ("prefetch", -2),
                       ("area_range", [0.5, 0.2]), ("area_range", [0.5, 1.5]), ("aspect_ratio_range", [0.0, 1.0]),
                       ("min_object_covered", 1.5), ("max_attempts", 0), ("crop_padding", -1),
                       ("private_threadpool_size", -1), ("max_intra_op_parallelism", -1), ("precheck_max_mb", -1),
                       ("image_size", 0)):
        with pytest.raises(UserError, match=r"^dataset\.{}={} must be ".format(key, re.escape(str(value)))):
            check_dataset(DatasetConfig(**{key: value}))


def test_list_files_and_count_records(records):
    files = list_files(records["slim"], "validation-*")
    assert [os.path.basename(f) for f in files] == ["validation-00000-of-00002",
                                                    "validation-00001-of-00002"]
    assert count_records(files) == 7
    assert count_records(files[0]) == 4
    assert count_records(files) == sum(
        1 for f in files for _ in tf.compat.v1.io.tf_record_iterator(f))


def test_missing_files_error_names_folder(records, tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        list_files(records["slim"], "nothing-*")
    assert records["slim"] in str(info.value) and "nothing-*" in str(info.value)
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError) as info:
        list_files(missing, "train-*")
    assert missing in str(info.value)
    with pytest.raises(UserError) as info:
        resolve_data_source(_cfg(data_dir=missing))
    assert missing in str(info.value)


def test_parse_record_keys_and_offset(records):
    def build():
        ds = tf.data.TFRecordDataset(os.path.join(records["ascend"], "data.tfrecord"))
        cfg = _cfg(image_key="image", label_key="label", label_offset=1)
        return ds.map(lambda s: pipeline.parse_record(s, cfg)).batch(10)

    (image_bytes, labels), = _collect(build)
    assert labels.dtype == np.int32
    assert labels.tolist() == [l - 1 for l in records["labels"]]
    assert list(image_bytes) == records["jpegs"]


# --------------------------------------------------------------------------- preprocessing


def test_imagenet_normalization_equals_per_channel_arithmetic_for_every_kind_of_shape():
    # The tiled rows must give exactly (x - mean) / std per channel, whatever is known of the shape.
    pixels = np.random.RandomState(0).uniform(-20.0, 300.0, (2, 5, 7, 3)).astype(np.float32)
    expected = (pixels - MEAN) / STD
    with tf.Graph().as_default():
        batch = tf.compat.v1.placeholder(tf.float32, [None, None, None, 3])
        unknown = tf.compat.v1.placeholder(tf.float32, None)
        outputs = [preprocessing.normalize(tf.constant(pixels), Normalization.imagenet),
                   preprocessing.normalize(tf.constant(pixels[0]), Normalization.imagenet),
                   preprocessing.normalize(batch, Normalization.imagenet),
                   preprocessing.normalize(unknown, Normalization.imagenet),
                   preprocessing.normalize(tf.constant(pixels[0].astype(np.uint8)), Normalization.imagenet)]
        assert outputs[0].shape.as_list() == [2, 5, 7, 3] and outputs[2].shape.as_list() == [None, None, None, 3]
        with tf.compat.v1.Session() as sess:
            whole, one, fed, anything, from_uint8 = sess.run(outputs, {batch: pixels, unknown: pixels})
    np.testing.assert_array_equal(whole, expected)
    np.testing.assert_array_equal(one, expected[0])
    np.testing.assert_array_equal(fed, expected)
    np.testing.assert_allclose(anything, expected, rtol=1e-6)  # rank unknown: plain broadcasting
    np.testing.assert_array_equal(from_uint8, (pixels[0].astype(np.uint8).astype(np.float32) - MEAN) / STD)


def test_normalize_modes_and_unknown(records):
    pixels = np.array([[[0.0, 127.5, 255.0]]], np.float32)
    imagenet, unit, lite, plain = _run_graph(lambda: [
        preprocessing.normalize(tf.constant(pixels), mode) for mode in (
            Normalization.imagenet, Normalization.unit, Normalization.lite)] + [
        preprocessing.normalize(tf.constant(pixels), Normalization.imagenet, rows=False)])
    np.testing.assert_allclose(imagenet, (pixels - MEAN) / STD, rtol=1e-6)
    np.testing.assert_allclose(unit, pixels / 255.0, rtol=1e-6)
    np.testing.assert_allclose(lite, (pixels - 127.0) / 128.0, rtol=1e-6)
    np.testing.assert_array_equal(plain, (pixels - MEAN) / STD)
    # The constants the exporter writes describe what normalize computes.
    for mode, out in ((Normalization.imagenet, imagenet), (Normalization.unit, unit), (Normalization.lite, lite)):
        mean, std = preprocessing.normalization_constants(mode)
        np.testing.assert_allclose(out, (pixels - np.float32(mean)) / np.float32(std), rtol=1e-6)
    assert preprocessing.normalization_constants("unit") == preprocessing.normalization_constants(Normalization.unit)
    with tf.Graph().as_default():
        with pytest.raises(ValueError, match="bogus"):
            preprocessing.normalize(tf.constant(pixels), "bogus")
        with pytest.raises(ValueError, match="bogus"):
            _build(_cfg(), records["slim"], "train-*", 2, 24, is_training=False, normalization="bogus")


def test_eval_preprocessing_is_reference_bit_for_bit(records):
    jpegs = records["jpegs"]

    def both():
        ours, ref = [], []
        for data in jpegs:
            image_bytes = tf.constant(data)
            ours.append(preprocessing.preprocess_for_eval(image_bytes, EVAL_SIZE))
            ref.append(_reference_eval(image_bytes, EVAL_SIZE))
        return ours, ref

    ours, ref = _run_graph(both)
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32 and a.shape == (EVAL_SIZE, EVAL_SIZE, 3)
        assert np.array_equal(a, b)

    # The crop window matches numpy float32 maths, and the window decode is (up to JPEG chroma
    # upsampling at the window edges) the same pixels as a full decode sliced with numpy.
    full = _run_graph(lambda: [tf.image.decode_jpeg(tf.constant(d), channels=3) for d in jpegs])
    windows = _run_graph(lambda: [tf.stack(_window(d)) for d in jpegs])
    cropped = _run_graph(lambda: [
        tf.image.decode_and_crop_jpeg(tf.constant(d), tf.stack(_window(d)), channels=3)
        for d in jpegs])
    for (h, w), image, window, crop in zip(SIZES, full, windows, cropped):
        size = int(np.float32(EVAL_SIZE / (EVAL_SIZE + 32.0)) * np.float32(min(h, w)))
        oh, ow = (h - size + 1) // 2, (w - size + 1) // 2
        assert window.tolist() == [oh, ow, size, size]
        assert crop.shape == (size, size, 3)
        reference = image[oh:oh + size, ow:ow + size].astype(np.float32)
        assert np.abs(crop.astype(np.float32) - reference).mean() < 2.0


def _window(data):
    shape = tf.image.extract_jpeg_shape(tf.constant(data))
    crop = tf.cast((EVAL_SIZE / (EVAL_SIZE + 32)) * tf.cast(tf.minimum(shape[0], shape[1]),
                                                             tf.float32), tf.int32)
    return [((shape[0] - crop) + 1) // 2, ((shape[1] - crop) + 1) // 2, crop, crop]


def test_train_falls_back_to_centre_crop_when_sampling_fails(records):
    # area_range (1, 1) can only yield the whole image -> the reference falls back to eval.
    def both():
        pairs = []
        for data in records["jpegs"]:
            image_bytes = tf.constant(data)
            pairs.append((preprocessing.preprocess_for_train(
                image_bytes, EVAL_SIZE, min_object_covered=1.0, area_range=(1.0, 1.0),
                random_flip=False, seed=3),
                preprocessing.preprocess_for_eval(image_bytes, EVAL_SIZE)))
        return pairs

    for train, evaluation in _run_graph(both):
        assert np.array_equal(train, evaluation)


# --------------------------------------------------------------------------- datasets


def test_eval_dataset_shapes_values_and_exact_once(records):
    batches = _collect(lambda: _build(
        _cfg(label_offset=1), records["slim"], "validation-*", 3, EVAL_SIZE, is_training=False))
    assert [b[1].shape[0] for b in batches] == [3, 3, 1]
    labels = np.concatenate([b[1] for b in batches])
    assert labels.dtype == np.int32
    # Every record once, offset applied; shards are read in parallel (a fixed round-robin order).
    assert sorted(labels.tolist()) == [l - 1 for l in records["labels"]]
    again = _collect(lambda: _build(
        _cfg(label_offset=1), records["slim"], "validation-*", 3, EVAL_SIZE, is_training=False))
    assert np.concatenate([b[1] for b in again]).tolist() == labels.tolist()
    images = np.concatenate([b[0] for b in batches])[np.argsort(labels)]
    assert images.dtype == np.float32 and images.shape == (7, EVAL_SIZE, EVAL_SIZE, 3)
    assert np.all(np.isfinite(images))
    assert -3.5 < images.min() and images.max() < 4.0
    assert abs(float(images.mean())) < 1.0  # imagenet normalisation: roughly centred

    # Bit for bit before normalisation: the eval map over the same records, ours vs the reference
    # composition (the normalisation itself may differ by an ulp between graph contexts).
    def both():
        ds = tf.data.TFRecordDataset(list_files(records["slim"], "validation-*"))
        ds = ds.map(lambda s: pipeline.parse_record(s, _cfg())[0])
        return ds.map(lambda b: (preprocessing.preprocess_image(b, EVAL_SIZE, False, _cfg()),
                                 _reference_eval(b, EVAL_SIZE))).batch(7)

    (ours, ref), = _collect(both)
    assert ours.dtype == np.float32 and np.array_equal(ours, ref)
    np.testing.assert_allclose(images, (ref - MEAN) / STD, rtol=1e-5, atol=1e-5)


def test_eval_unit_scale_range(records):
    batches = _collect(lambda: _build(
        _cfg(normalization=Normalization.unit), records["slim"], "validation-*", 4, 32, is_training=False))
    images = np.concatenate([b[0] for b in batches]) * 255.0
    assert images.shape == (7, 32, 32, 3)
    assert np.all(np.isfinite(images)) and images.min() > -50 and images.max() < 300


def test_train_dataset_shapes_and_ranges(records):
    batches = _collect(lambda: _build(
        _cfg(normalization=Normalization.unit), records["slim"], "train-*", 4, 32, is_training=True, seed=1),
        max_batches=6)
    assert len(batches) == 6  # repeats forever
    for images, labels in batches:
        assert images.dtype == np.float32 and images.shape == (4, 32, 32, 3)
        assert labels.dtype == np.int32 and labels.shape == (4,)
        pixels = images * 255.0
        assert np.all(np.isfinite(pixels)) and pixels.min() > -50 and pixels.max() < 300
    labels = np.concatenate([b[1] for b in batches])
    assert set(labels.tolist()) == set(records["labels"])  # every record visited, no offset

    with tf.Graph().as_default():
        ds = _build(_cfg(), records["slim"], "train-*", 4, 32, True)
        images_spec, labels_spec = tf.compat.v1.data.get_output_shapes(ds)
        assert images_spec.as_list() == [4, 32, 32, 3] and labels_spec.as_list() == [4]
    normalised = _collect(lambda: _build(
        _cfg(), records["slim"], "train-*", 4, 32, is_training=True, seed=1), max_batches=4)
    images = np.concatenate([b[0] for b in normalised])
    assert np.all(np.isfinite(images)) and -3.5 < images.min() and images.max() < 4.0
    assert abs(float(images.mean())) < 1.0


def test_train_is_deterministic_given_seed(records):
    # A parallel map: each image's crop and flip come from its own stateless seed, not from the
    # order in which the map's threads happen to draw.
    def run(seed):
        return _collect(lambda: _build(
            _cfg(num_parallel_calls=4), records["slim"], "train-*", 4, 24, is_training=True,
            seed=seed), max_batches=5)

    first, second, other = run(7), run(7), run(8)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, second))
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, second))
    order = np.concatenate([b[1] for b in first])
    assert not np.array_equal(order, np.concatenate([b[1] for b in other]))


def test_train_stream_resumes_at_its_position(records):
    """A resumed run's stream (start_position = records delivered before) continues exactly where the
    uninterrupted stream was, across epoch boundaries; each epoch is a new permutation of all records."""
    def stream(start, count):
        return _collect(lambda: _build(
            _cfg(), records["slim"], "train-*", 1, 16, is_training=True, seed=5,
            start_position=start), max_batches=count)

    def labels(batches):
        return [int(b[1][0]) for b in batches]

    full = stream(0, 28)
    epochs = [labels(full)[i:i + 7] for i in range(0, 28, 7)]
    assert all(sorted(e) == records["labels"] for e in epochs)
    assert len(set(tuple(e) for e in epochs)) > 1
    for start in (3, 7, 12):
        resumed = stream(start, 9)
        assert labels(resumed) == labels(full)[start:start + 9]
        # The same crops and flips as the uninterrupted stream, too.
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(resumed, full[start:start + 9]))


@pytest.mark.parametrize("policy", ["autoaugment", "randaugment"])
def test_augmented_stream_is_the_same_whatever_the_threads_and_resumes_exactly(records, policy):
    """Every choice of the policy comes from the image's stateless seed: a parallel map gives the batches of a
    sequential one, and a resumed stream the augmented images of the uninterrupted one."""
    def stream(threads, start, count, augment=policy):
        return _collect(lambda: _build(
            _cfg(num_parallel_calls=threads, augment=augment), records["slim"], "train-*", 1, 32,
            is_training=True, seed=3, start_position=start), max_batches=count)

    # Both at once: a sequential map resumed after 5 images against an uninterrupted parallel one.
    parallel, resumed = stream(4, 0, 14), stream(1, 5, 9)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(resumed, parallel[5:]))
    # The policy is on: the same crops without it differ from these in most images.
    plain = stream(4, 0, 14, augment="none")
    changed = sum(not np.array_equal(a[0], b[0]) for a, b in zip(plain, parallel))
    assert changed >= 7, changed


def test_augment_config_is_checked():
    for key, value in (("num_layers", -1), ("num_layers", 17), ("magnitude", -0.5), ("magnitude", 31.0)):
        cfg = DatasetConfig()
        setattr(cfg.randaugment, key, value)
        with pytest.raises(UserError, match=r"dataset\.randaugment\.{}={}".format(key, value)):
            check_dataset(cfg)


@pytest.mark.parametrize("pattern", ["validation-*", "validation-00000-*"])
def test_sharding_covers_every_record_once(records, pattern):
    # Two files -> file-level shards; one file -> record-level shards.
    seen = []
    for index in range(2):
        batches = _collect(lambda: _build(
            _cfg(), records["slim"], pattern, 2, 24, is_training=False, num_shards=2,
            shard_index=index))
        seen.append(np.concatenate([b[1] for b in batches]).tolist())
    expected = 7 if pattern == "validation-*" else 4
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == records["labels"][:expected]


# --------------------------------------------------------------------------- bundled digits


def test_prepare_digits(tmp_path):
    with pytest.raises(ValueError, match="digits"):
        bundled.prepare_builtin("nope", str(tmp_path))
    info = bundled.prepare_builtin("digits", str(tmp_path / "cache"))
    folder = info["data_dir"]
    assert folder == os.path.join(str(tmp_path / "cache"), "digits-v1")
    assert info["num_classes"] == 10 and info["class_names"] == [str(i) for i in range(10)]
    assert info["num_train"] + info["num_eval"] == 1797
    assert 0.18 < info["num_eval"] / 1797.0 < 0.22
    with open(os.path.join(folder, "manifest.json")) as handle:
        manifest = json.load(handle)
    for split in ("train", "validation"):
        per_class = manifest["splits"][split]["per_class"]
        assert sorted(per_class) == info["class_names"] and min(per_class.values()) > 0
        for name in manifest["splits"][split]["files"]:
            assert os.path.isfile(os.path.join(folder, name))
    with open(os.path.join(folder, "labels.txt")) as handle:
        assert handle.read().split() == info["class_names"]
    train_files = list_files(folder, "train-*")
    eval_files = list_files(folder, "validation-*")
    assert [os.path.basename(f) for f in train_files] == ["train-00000-of-00002",
                                                          "train-00001-of-00002"]
    assert count_records(train_files) == info["num_train"]
    assert count_records(eval_files) == info["num_eval"]
    assert [p for p in os.listdir(str(tmp_path / "cache")) if p != "digits-v1"] == []

    stamps = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder)}
    again = bundled.prepare_builtin("digits", str(tmp_path / "cache"))
    assert again == info
    assert stamps == {name: os.stat(os.path.join(folder, name)).st_mtime_ns
                      for name in os.listdir(folder)}

    # Raw JPEGs decode to 32x32x3; the eval pipeline sees every validation record once.
    def decode_some():
        ds = tf.data.TFRecordDataset(eval_files).take(5)
        ds = ds.map(lambda s: pipeline.parse_record(s, DatasetConfig()))
        return ds.map(lambda b, l: (tf.io.decode_jpeg(b, channels=3), l)).batch(5)

    (images, labels), = _collect(decode_some)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert labels.min() >= 0 and labels.max() <= 9
    batches = _collect(lambda: _build(
        _cfg(), folder, "validation-*", 64, 32, is_training=False))
    labels = np.concatenate([b[1] for b in batches])
    assert len(labels) == info["num_eval"]
    assert np.bincount(labels, minlength=10).tolist() == [
        manifest["splits"]["validation"]["per_class"][name] for name in info["class_names"]]


# --------------------------------------------------------------------------- PNG, greyscale, CMYK, other formats


def _encode_pngs(images):
    with tf.Graph().as_default():
        return _run_graph(lambda: [tf.image.encode_png(tf.constant(image)) for image in images])


def _reference_eval_png(image_bytes, size, crop_padding=32):
    """The reference centre crop on a fully decoded PNG: slice the same window, same resize."""
    image = tf.io.decode_png(image_bytes, channels=3)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    crop = tf.cast((size / (size + crop_padding)) * tf.cast(tf.minimum(height, width), tf.float32),
                   tf.int32)
    offset_h = ((height - crop) + 1) // 2
    offset_w = ((width - crop) + 1) // 2
    window = image[offset_h:offset_h + crop, offset_w:offset_w + crop]
    return tf.compat.v1.image.resize_bicubic([window], [size, size])[0]


def test_png_eval_and_train_preprocessing():
    images = [_pattern(h, w, i) for i, (h, w) in enumerate(SIZES)]
    pngs = _encode_pngs(images)

    def graph():
        out = []
        for data in pngs:
            image_bytes = tf.constant(data)
            out.append((preprocessing.preprocess_for_eval(image_bytes, EVAL_SIZE),
                        _reference_eval_png(image_bytes, EVAL_SIZE),
                        preprocessing.preprocess_for_eval(image_bytes, EVAL_SIZE, image_format="png"),
                        preprocessing.preprocess_for_train(
                            image_bytes, EVAL_SIZE, min_object_covered=1.0, area_range=(1.0, 1.0),
                            random_flip=False, seed=3),
                        preprocessing.preprocess_for_train(image_bytes, 32, seed=5)))
        return out

    for auto, reference, forced, fallback, train in _run_graph(graph):
        assert auto.dtype == np.float32 and auto.shape == (EVAL_SIZE, EVAL_SIZE, 3)
        assert np.array_equal(auto, reference) and np.array_equal(auto, forced)
        assert np.array_equal(fallback, auto)  # sampling failed -> the eval crop, as for JPEG
        assert train.shape == (32, 32, 3) and np.all(np.isfinite(train))
        assert -50 < train.min() and train.max() < 300


def test_greyscale_and_cmyk_jpegs_decode_to_rgb():
    import io

    from PIL import Image

    pixels = _pattern(48, 64, 1)
    pixels[..., 2] = 255 - pixels[..., 0] // 2  # smooth: JPEG chroma subsampling keeps it
    out = {}
    for mode in ("L", "CMYK"):
        buffer = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", quality=95)
        out[mode] = buffer.getvalue()
    grey, cmyk = _run_graph(lambda: [preprocessing.preprocess_for_eval(tf.constant(out[m]), 32)
                                     for m in ("L", "CMYK")])
    assert grey.shape == cmyk.shape == (32, 32, 3)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() < 1e-3  # grey stays grey, in 3 channels
    # CMYK comes back as the RGB it was made from (JPEG-lossy).
    reference = _run_graph(lambda: preprocessing.preprocess_for_eval(
        tf.constant(_encode_pngs([pixels])[0]), 32))
    assert np.abs(cmyk - reference).mean() < 4.0


def test_unsupported_format_is_a_clear_error():
    gif = b"GIF89a" + b"\x01\x00\x01\x00\x00\x00\x00;" * 4
    with tf.Graph().as_default():
        image = preprocessing.preprocess_for_eval(tf.constant(gif), 32)
        with tf.compat.v1.Session() as sess:
            with pytest.raises(tf.errors.InvalidArgumentError) as info:
                sess.run(image)
    assert preprocessing.UNSUPPORTED_FORMAT_MESSAGE in info.value.message
    with pytest.raises(ValueError, match="bmp"):
        preprocessing.preprocess_for_eval(tf.constant(gif), 32, image_format="bmp")


# --------------------------------------------------------------------------- DataSource input, options


def test_build_from_data_source_options_and_cache(records):
    files = list_files(records["slim"], "validation-*")
    source = DataSource(records["slim"], [], files, None, 7, None)
    cfg = _cfg(label_offset=1, private_threadpool_size=2, max_intra_op_parallelism=1, autotune=False,
               cache_eval=True)
    with tf.Graph().as_default():
        dataset = pipeline.build_dataset(source, cfg, is_training=False, batch_size=4, image_size=EVAL_SIZE,
                                         normalization=Normalization.imagenet)
        images_spec, _ = tf.compat.v1.data.get_output_shapes(dataset)
        assert images_spec.as_list() == [None, EVAL_SIZE, EVAL_SIZE, 3]
        # cache_eval: a second pass over the same iterator gives the same batches.
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset.repeat(2))
        batch = iterator.get_next()
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            seen = []
            while True:
                try:
                    seen.append(sess.run(batch))
                except tf.errors.OutOfRangeError:
                    break
    assert len(seen) == 4
    for first, second in zip(seen[:2], seen[2:]):
        assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert sorted(np.concatenate([b[1] for b in seen[:2]]).tolist()) == list(range(7))
    with pytest.raises(ValueError, match="no training files"):
        pipeline.build_dataset(source, cfg, is_training=True, batch_size=4, image_size=EVAL_SIZE,
                               normalization=Normalization.imagenet)


def test_tfrecord_source_reads_manifest_and_labels(records, tmp_path):
    folder = tmp_path / "withmanifest"
    folder.mkdir()
    for name in os.listdir(records["slim"]):
        with open(os.path.join(records["slim"], name), "rb") as src:
            (folder / name).write_bytes(src.read())
    names = ["c{}".format(i) for i in range(7)]
    (folder / "manifest.json").write_text(json.dumps(
        {"num_classes": 7, "label_offset": 1, "class_names": names}))
    source = resolve_data_source(DatasetConfig(data_dir=str(folder), num_classes=0, label_offset=1))
    assert source.class_names == names and source.num_classes == 7
    assert source.num_train == 7 and source.num_eval == 7 and source.kind == "tfrecord"
    with pytest.raises(UserError, match="num_classes=5.*7 classes"):
        resolve_data_source(DatasetConfig(data_dir=str(folder), num_classes=5, label_offset=1))
    with pytest.raises(UserError, match="label_offset=0.*offset 1"):
        resolve_data_source(DatasetConfig(data_dir=str(folder), num_classes=7, label_offset=0))
    # Without a manifest, labels.txt names the classes when it has num_classes lines.
    os.remove(str(folder / "manifest.json"))
    (folder / "labels.txt").write_text("".join(n + "\n" for n in names))
    source = resolve_data_source(DatasetConfig(data_dir=str(folder), num_classes=7, label_offset=1))
    assert source.class_names == names
