"""dataset=image_folder: scanning and splitting folders, reading them through build_dataset, and run.py."""
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, run_py
from effnet_exp.data import folder as image_folder
from effnet_exp.data import pipeline
from effnet_exp.data.config import DatasetConfig, Normalization
from effnet_exp.data.source import resolve_data_source
from effnet_exp.errors import UserError

# One dominant colour per class, so a label can be checked against the pixels it came with.
COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


# --------------------------------------------------------------------------- helpers (used by other tests too)


def image_pixels(height, width, colour, seed):
    rng = np.random.RandomState(seed)
    base = np.array(colour, np.float64)[None, None, :]
    noise = rng.uniform(-20, 20, size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def image_bytes(pixels, fmt="jpeg", mode="RGB"):
    """Encoded bytes of pixels: fmt "jpeg" or "png"; mode "RGB", "L" (greyscale) or "CMYK" (JPEG)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, "JPEG" if fmt == "jpeg" else "PNG", quality=95)
    return out.getvalue()


def write_image(path, pixels, fmt="jpeg", mode="RGB"):
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        os.makedirs(parent)
    with open(path, "wb") as handle:
        handle.write(image_bytes(pixels, fmt, mode))


def make_class_folder(root, counts, start_seed=0):
    """root/<class>/<i>.<ext> for counts = {class name: n}, class k in COLOURS[k] (sorted names).

    A mix per class: RGB JPEG, PNG, greyscale JPEG, CMYK JPEG, and a PNG saved under a .jpg name.
    Returns {path: label}.
    """
    labels = {}
    for label, name in enumerate(sorted(counts)):
        for i in range(counts[name]):
            variant = i % 5
            fmt, mode, ext = [("jpeg", "RGB", "jpg"), ("png", "RGB", "png"), ("jpeg", "L", "jpeg"),
                              ("jpeg", "CMYK", "JPG"), ("png", "RGB", "jpg")][variant]
            pixels = image_pixels(36 + 3 * i, 44 + 2 * (i % 3), COLOURS[label], start_seed + 100 * label + i)
            path = os.path.join(str(root), name, "{:02d}.{}".format(i, ext))
            write_image(path, pixels, fmt, mode)
            labels[path] = label
    return labels


def _collect(dataset, max_batches=None):
    iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
    batch = iterator.get_next()
    out = []
    with tf.compat.v1.Session() as sess:
        sess.run(iterator.initializer)
        while max_batches is None or len(out) < max_batches:
            try:
                out.append(sess.run(batch))
            except tf.errors.OutOfRangeError:
                break
    return out


# --------------------------------------------------------------------------- scanning


def test_scan_classes_split_is_stratified_and_deterministic(tmp_path):
    counts = {"b_dog": 10, "a_cat": 5, "c_emu": 2}
    labels = make_class_folder(tmp_path, counts)
    # Ignored: hidden files and folders, non-image files; nested folders are read.
    (tmp_path / "a_cat" / ".hidden.jpg").write_bytes(b"x")
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    nested = str(tmp_path / "a_cat" / "more" / "deep.png")
    write_image(nested, image_pixels(40, 40, COLOURS[0], 9), "png")
    labels[nested] = 0

    split = image_folder.scan_image_folder(str(tmp_path), 0.2, seed=3)
    assert split.class_names == ["a_cat", "b_dog", "c_emu"] and split.layout == "classes"
    assert split.ignored == 1
    everything = split.train + split.val
    assert sorted(p for p, _ in everything) == sorted(labels)
    assert all(labels[p] == l for p, l in everything)
    per_class_val = [sum(1 for _, l in split.val if l == k) for k in range(3)]
    assert per_class_val == [1, 2, 1]  # round(0.2 * n), at least 1 and at most n - 1
    assert split.val == sorted(split.val, key=lambda item: (item[1], item[0]))
    again = image_folder.scan_image_folder(str(tmp_path), 0.2, seed=3)
    assert again == split
    other = image_folder.scan_image_folder(str(tmp_path), 0.2, seed=4)
    assert other.val != split.val and len(other.val) == len(split.val)
    none = image_folder.scan_image_folder(str(tmp_path), 0.0, seed=3)
    assert none.val == [] and len(none.train) == len(labels)


def test_scan_train_and_val_trees(tmp_path):
    make_class_folder(tmp_path / "train", {"x": 3, "y": 3})
    make_class_folder(tmp_path / "val", {"x": 1, "y": 2})
    split = image_folder.scan_image_folder(str(tmp_path), 0.5)
    assert split.layout == "split" and split.class_names == ["x", "y"]
    assert len(split.train) == 6 and [l for _, l in split.val] == [0, 1, 1]
    assert all(os.sep + "val" + os.sep in p for p, _ in split.val)

    only_train = tmp_path / "only"
    make_class_folder(only_train / "train", {"x": 4, "y": 4})
    split = image_folder.scan_image_folder(str(only_train), 0.25)
    assert split.layout == "train_only" and len(split.val) == 2 and len(split.train) == 6


def test_scan_errors_name_the_folder_and_fault(tmp_path):
    def fails(path, *match, **kwargs):
        with pytest.raises(UserError) as info:
            image_folder.scan_image_folder(str(path), **kwargs)
        text = str(info.value)
        assert "\n" not in text
        for m in match:
            assert m in text, text
        return text

    fails(tmp_path / "missing", "dataset.root=", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(empty, "has no class folders")
    loose = tmp_path / "loose"
    write_image(str(loose / "a.jpg"), image_pixels(8, 8, COLOURS[0], 0))
    fails(loose, "1 images lie directly in it")
    no_images = tmp_path / "noimages"
    make_class_folder(no_images, {"a": 2})
    (no_images / "b").mkdir()
    (no_images / "b" / "readme.txt").write_text("x")
    fails(no_images, str(no_images / "b"), "has no images")
    bmp = tmp_path / "bmp"
    make_class_folder(bmp, {"a": 2})
    (bmp / "a" / "z.bmp").write_bytes(b"BM" + b"\0" * 60)
    fails(bmp, str(bmp / "a" / "z.bmp"), "only JPEG and PNG")
    extra = tmp_path / "extra"
    make_class_folder(extra / "train", {"a": 2})
    make_class_folder(extra / "val", {"a": 1, "zzz": 1})
    fails(extra, "'zzz'", "no counterpart")
    fails(no_images, "[0, 1)", val_fraction=1.0)
    assert "--src=" in fails(tmp_path / "missing", what="--src")


def test_resolve_image_folder_source(tmp_path):
    make_class_folder(tmp_path, {"a": 5, "b": 5, "c": 5})
    source = resolve_data_source(DatasetConfig(root=str(tmp_path), num_classes=0))
    assert source.kind == "folder" and source.num_classes == 3
    assert source.class_names == ["a", "b", "c"] and source.data_dir == str(tmp_path)
    assert source.num_train == 12 and source.num_eval == 3
    assert source.train_files == [p for p, _ in source.train_items]
    assert source == resolve_data_source(DatasetConfig(root=str(tmp_path), num_classes=3))
    with pytest.raises(UserError, match=r"dataset.num_classes=5 but dataset.root=.* has 3 class folders"):
        resolve_data_source(DatasetConfig(root=str(tmp_path), num_classes=5))
    with pytest.raises(UserError, match="no validation images"):
        resolve_data_source(DatasetConfig(root=str(tmp_path), num_classes=0, val_fraction=0.0))
    # Training alone does not need a validation split.
    source = resolve_data_source(DatasetConfig(root=str(tmp_path), num_classes=0, val_fraction=0.0),
                                 need_eval=False)
    assert source.num_train == 15


# --------------------------------------------------------------------------- reading


def test_folder_pipeline_reads_jpeg_png_grey_cmyk_with_the_right_labels(tmp_path):
    make_class_folder(tmp_path, {"a": 5, "b": 5, "c": 5})
    cfg = DatasetConfig(root=str(tmp_path), num_classes=0, normalization=Normalization.unit, val_fraction=0.4,
                        shuffle_buffer=8, cycle_length=2, num_parallel_calls=2)
    source = resolve_data_source(cfg)
    assert source.num_eval == 6
    with tf.Graph().as_default():
        batches = _collect(pipeline.build_dataset(source, cfg, is_training=False, batch_size=4, image_size=32,
                                                  normalization=cfg.normalization))
    labels = np.concatenate([b[1] for b in batches])
    images = np.concatenate([b[0] for b in batches])
    assert labels.tolist() == [l for _, l in source.eval_items]  # every image once, in list order
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.float32
    for image, label in zip(images, labels):
        means = image.reshape(-1, 3).mean(axis=0)
        grey = means.max() - means.min() < 0.05
        assert grey or int(np.argmax(means)) == label, (means, label)

    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(1)
        # A source resolved for training only.
        train_source = resolve_data_source(cfg, need_eval=False)
        train = _collect(pipeline.build_dataset(train_source, cfg, is_training=True, batch_size=4, image_size=32,
                                                normalization=cfg.normalization, seed=1), max_batches=6)
    for images, labels in train:
        assert images.shape == (4, 32, 32, 3) and labels.shape == (4,)
        assert np.all(np.isfinite(images))
        for image, label in zip(images, labels):
            means = image.reshape(-1, 3).mean(axis=0)
            assert means.max() - means.min() < 0.05 or int(np.argmax(means)) == label
    assert set(np.concatenate([b[1] for b in train]).tolist()) == {0, 1, 2}


def test_run_py_trains_and_evaluates_an_image_folder(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_class_folder(root / "train", {"cat": 4, "dog": 4, "emu": 3})
    make_class_folder(root / "val", {"cat": 2, "dog": 2, "emu": 2})
    bad = root / "val" / "dog" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    out = tmp_path / "run"
    # No dataset.num_classes: the class count comes from the class folders.
    proc = run_py(TINY + ["dataset=image_folder", "dataset.root=" + str(root),
                          "dataset.skip_bad_records=true", "hydra.run.dir=" + str(out)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(str(out / "labels.txt")) as handle:
        assert handle.read().split("\n")[:3] == ["cat", "dog", "emu"]
    with open(str(out / "eval.json")) as handle:
        result = json.load(handle)
    assert result["num_images"] == 6  # the broken image skipped
    assert result["step"] == 4 and 0 <= result["top1"] <= 1
    with open(str(out / "run.log")) as handle:
        assert "skipped bad image {}".format(bad) in handle.read()
    assert result["skipped_records"] == 1
