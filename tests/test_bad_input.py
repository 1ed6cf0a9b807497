"""Bad input given to run.py: each gives one `error:` line naming the file at fault, exit status 2, no traceback,
and no result written half-way. Real files: TFRecords, images, checkpoints of a tiny trained run."""
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest

from conftest import TINY, run_py
from effnet_exp.data.bundled import prepare_builtin
from effnet_exp.data.folder import MAX_IMAGE_PIXELS
from effnet_exp.data.records import write_tfrecord
from effnet_exp.tools.make_tfrecords import load_image
from test_bad_records import _serialized
from test_image_folder import COLOURS, image_pixels, make_class_folder, write_image

BROKEN_JPEG = b"\xff\xd8\xff\xe0" + b"\x13" * 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A tiny trained run folder (checkpoints at steps 2 and 4), shared; tests change copies of it."""
    base = tmp_path_factory.mktemp("bad_input")
    run_dir = base / "run"
    proc = run_py(TINY + ["mode=train", "hydra.run.dir=" + str(run_dir)], base, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(run_dir)


@pytest.fixture(scope="module")
def digits(cache_dir):
    return prepare_builtin("digits", cache_dir)["data_dir"]


def copy_run(trained, tmp_path):
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    return copy


def data_dir(tmp_path, digits, split_from_digits):
    """A TFRecord folder holding the digits' shards of one split ("train" or "validation"), as symlinks."""
    folder = tmp_path / "data"
    folder.mkdir()
    for name in os.listdir(digits):
        if name.startswith(split_from_digits + "-"):
            os.symlink(os.path.join(digits, name), str(folder / name))
    return folder


def one_error(proc, *names):
    """The run stopped with exit status 2 and exactly one `error:` line, naming each of names."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def bomb_png(width=30000, height=30000):
    """A tiny PNG whose header declares a huge 1-bit image (its data holds only the first rows)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * ((1 + width // 8) * 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def tfrecord_args(folder, *extra):
    return TINY + ["dataset=tfrecord", "dataset.data_dir=" + str(folder), "dataset.num_classes=10"] + list(extra)


# --------------------------------------------------------------------------- 1. no validation images


@pytest.mark.parametrize("mode", ["eval", "train_eval"])
def test_empty_validation_files(trained, digits, tmp_path, cache_dir, mode):
    folder = data_dir(tmp_path, digits, "train")
    empty = folder / "validation-00000-of-00001"
    empty.write_bytes(b"")
    out = tmp_path / "out"
    args = ["mode=" + mode, "hydra.run.dir=" + str(out)]
    if mode == "eval":
        args.append("eval.checkpoint=" + trained)
    line = one_error(run_py(tfrecord_args(folder, *args), tmp_path, cache_dir), empty)
    assert "no records" in line
    assert not (out / "eval.json").exists() and not (out / "checkpoints").exists()


def test_every_validation_record_skipped(trained, digits, tmp_path, cache_dir):
    folder = data_dir(tmp_path, digits, "train")
    bad = str(folder / "validation-00000-of-00001")
    write_tfrecord(bad, [_serialized(i, image=BROKEN_JPEG) for i in range(3)])
    out = tmp_path / "out"
    proc = run_py(tfrecord_args(folder, "mode=eval", "eval.checkpoint=" + trained, "dataset.skip_bad_records=true",
                                "hydra.run.dir=" + str(out)), tmp_path, cache_dir)
    line = one_error(proc, folder, bad)
    assert "all 3 record(s) were bad and skipped" in line
    assert not (out / "eval.json").exists()


# --------------------------------------------------------------------------- 2. image folders without images


@pytest.mark.parametrize("layout", ["empty_root", "no_images_at_all", "one_class_without_images"])
def test_image_folder_without_images(tmp_path, cache_dir, layout):
    root = tmp_path / "pets"
    root.mkdir()
    at_fault = root
    if layout == "no_images_at_all":
        for name in ("cat", "dog"):
            (root / name).mkdir()
            (root / name / "notes.txt").write_text(u"no image here")
        at_fault = root / "cat"
    elif layout == "one_class_without_images":
        make_class_folder(root, {"cat": 3})
        (root / "dog").mkdir()
        at_fault = root / "dog"
    out = tmp_path / "out"
    proc = run_py(TINY + ["dataset=image_folder", "dataset.root=" + str(root), "hydra.run.dir=" + str(out)],
                  tmp_path, cache_dir)
    one_error(proc, at_fault)
    assert not (out / "checkpoints").exists() and not (out / "eval.json").exists()


# --------------------------------------------------------------------------- 3. a truncated checkpoint index


@pytest.mark.parametrize("how", ["eval", "resume"])
def test_truncated_checkpoint_index(trained, tmp_path, cache_dir, how):
    run_dir = copy_run(trained, tmp_path)
    index = os.path.join(run_dir, "checkpoints", "model.ckpt-4.index")
    with open(index, "rb") as handle:
        data = handle.read()
    with open(index, "wb") as handle:
        handle.write(data[:len(data) // 2])
    before = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    metrics = open(os.path.join(run_dir, "metrics.jsonl")).read()
    out = tmp_path / "out"
    if how == "eval":
        args = ["mode=eval", "eval.checkpoint=" + run_dir, "hydra.run.dir=" + str(out)]
    else:
        args = ["resume=" + run_dir, "train.steps=6"]
    one_error(run_py(args, tmp_path, cache_dir), index)
    assert not (out / "eval.json").exists() and not os.path.exists(os.path.join(run_dir, "eval.json"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == before
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == metrics


# --------------------------------------------------------------------------- 4. labels.txt of the wrong length


def test_run_folder_labels_of_the_wrong_length(trained, tmp_path, cache_dir):
    run_dir = copy_run(trained, tmp_path)
    labels = os.path.join(run_dir, "labels.txt")
    with open(labels, "w") as handle:
        handle.write("".join("class{}\n".format(i) for i in range(7)))
    image = tmp_path / "a.png"
    write_image(str(image), image_pixels(40, 40, COLOURS[0], 0), "png")
    out = tmp_path / "out"
    proc = run_py(["mode=predict", "eval.checkpoint=" + run_dir, "predict.images=[{}]".format(image),
                   "hydra.run.dir=" + str(out)], tmp_path, cache_dir)
    line = one_error(proc, labels)
    assert "7 lines" in line and "10 classes" in line
    assert not (out / "predictions.json").exists()


def test_dataset_labels_of_the_wrong_length(digits, tmp_path, cache_dir):
    folder = data_dir(tmp_path, digits, "train")
    for name in os.listdir(digits):
        if name.startswith("validation-"):
            os.symlink(os.path.join(digits, name), str(folder / name))
    (folder / "labels.txt").write_text(u"zero\none\ntwo\n")
    out = tmp_path / "out"
    line = one_error(run_py(tfrecord_args(folder, "hydra.run.dir=" + str(out)), tmp_path, cache_dir),
                     folder / "labels.txt")
    assert "3 lines" in line and "dataset.num_classes=10" in line
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- 5. a shard that is no TFRecord


@pytest.mark.parametrize("split", ["train", "validation"])
def test_shard_that_is_not_a_tfrecord(trained, digits, tmp_path, cache_dir, split):
    folder = data_dir(tmp_path, digits, "validation" if split == "train" else "train")
    shard = folder / "{}-00000-of-00001".format(split)
    out = tmp_path / "out"
    if split == "train":  # caught by the precheck, before training
        shard.write_text(u"these are not the records you are looking for\n" * 20)
        args = ["mode=train"]
    else:  # not prechecked: caught while evaluating
        shard.write_bytes(np.random.RandomState(0).bytes(4096))
        args = ["mode=eval", "eval.checkpoint=" + trained, "dataset.precheck_max_mb=0",
                "dataset.num_eval_images=10"]
    proc = run_py(tfrecord_args(folder, "hydra.run.dir=" + str(out), *args), tmp_path, cache_dir)
    line = one_error(proc, shard)
    assert "not a TFRecord file" in line
    assert not (out / "checkpoints").exists() and not (out / "eval.json").exists()


# --------------------------------------------------------------------------- 6. empty images, decompression bombs


def test_predict_refuses_empty_and_oversized_images(trained, tmp_path, cache_dir):
    empty, bomb, good = tmp_path / "empty.jpg", tmp_path / "bomb.png", tmp_path / "good.png"
    empty.write_bytes(b"")
    bomb.write_bytes(bomb_png())
    write_image(str(good), image_pixels(40, 40, COLOURS[1], 1), "png")
    out = tmp_path / "out"
    proc = run_py(["mode=predict", "eval.checkpoint=" + trained, "predict.images=[{},{},{}]".format(empty, bomb, good),
                   "hydra.run.dir=" + str(out)], tmp_path, cache_dir)
    line = one_error(proc, empty, "2 of 3 images could not be predicted")
    assert "0 bytes" in line
    results = json.load(open(str(out / "predictions.json")))  # whole: valid JSON, one entry per image
    assert [r["image"] for r in results] == [str(empty), str(bomb), str(good)]
    assert str(empty) in results[0]["error"] and "empty (0 bytes)" in results[0]["error"]
    assert str(bomb) in results[1]["error"] and "30000x30000" in results[1]["error"]
    assert str(MAX_IMAGE_PIXELS) in results[1]["error"]
    assert "top5" in results[2]


def test_image_folder_refuses_a_decompression_bomb(tmp_path, cache_dir):
    root = tmp_path / "pets"
    make_class_folder(root, {"cat": 3, "dog": 3})
    bomb = root / "dog" / "zz_bomb.png"
    bomb.write_bytes(bomb_png())
    out = tmp_path / "out"
    proc = run_py(TINY + ["dataset=image_folder", "dataset.root=" + str(root), "dataset.val_fraction=0",
                          "mode=train", "hydra.run.dir=" + str(out)], tmp_path, cache_dir)
    line = one_error(proc, bomb)
    assert "30000x30000" in line and str(MAX_IMAGE_PIXELS) in line


def test_make_tfrecords_refuses_empty_and_oversized_images(tmp_path):
    empty, bomb = tmp_path / "empty.jpg", tmp_path / "bomb.png"
    empty.write_bytes(b"")
    bomb.write_bytes(bomb_png(12000, 12000))  # above the limit, below Pillow's own error (twice the limit)
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        load_image(str(empty))
    with pytest.raises(ValueError, match="12000x12000 pixels .* limit of {}".format(MAX_IMAGE_PIXELS)):
        load_image(str(bomb))
