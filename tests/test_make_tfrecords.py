"""python -m effnet_exp.tools.make_tfrecords: format, manifest, determinism, atomicity, reading it back."""
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from effnet_exp.data import pipeline
from effnet_exp.data.config import DatasetConfig, Normalization
from effnet_exp.data.source import resolve_data_source
from effnet_exp.tools import make_tfrecords
from test_image_folder import make_class_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(path):
    return [tf.train.Example.FromString(r) for r in tf.compat.v1.io.tf_record_iterator(path)]


def _feature(example, key):
    feature = example.features.feature[key]
    return feature.bytes_list.value[0] if feature.bytes_list.value else feature.int64_list.value[0]


def _tree(folder):
    """{name: bytes} of every file in folder, hidden ones included."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            out[name] = handle.read()
    return out


@pytest.fixture(scope="module")
def source_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    labels = make_class_folder(root, {"ant": 7, "bee": 6, "cow": 5})
    # Unreadable: a truncated JPEG, and GIF data under a .jpg name.
    good = open(sorted(p for p in labels if p.endswith("00.jpg"))[0], "rb").read()
    (root / "bee" / "truncated.jpg").write_bytes(good[:len(good) // 3])
    (root / "cow" / "gif.jpg").write_bytes(b"GIF89a" + b"\0" * 40)
    return str(root), labels


def _convert(src, out, *extra):
    return make_tfrecords.main(["--src", src, "--out", str(out), "--shards", "3", "--quiet"] + list(extra))


def test_output_format_manifest_and_bad_images(source_folder, tmp_path, capsys):
    src, labels = source_folder
    out = tmp_path / "out"
    assert _convert(src, out, "--label-offset", "1", "--workers", "1") == 0
    err = capsys.readouterr().err
    assert os.path.join(src, "bee", "truncated.jpg") in err and os.path.join(src, "cow", "gif.jpg") in err
    assert "skipped 2 unreadable image(s)" in err

    names = sorted(os.listdir(str(out)))
    assert names == ["labels.txt", "manifest.json", "train-00000-of-00003", "train-00001-of-00003",
                     "train-00002-of-00003", "validation-00000-of-00001"]
    assert (out / "labels.txt").read_text() == "ant\nbee\ncow\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["label_offset"] == 1
    assert manifest["class_names"] == ["ant", "bee", "cow"]
    assert manifest["splits"]["validation"]["per_class"] == {"ant": 1, "bee": 1, "cow": 1}
    assert manifest["splits"]["train"]["per_class"] == {"ant": 6, "bee": 5, "cow": 4}
    assert manifest["splits"]["train"]["num_records"] == 15
    assert manifest["splits"]["train"]["files"] == names[2:5]
    assert [s["path"] for s in manifest["skipped"]] == ["bee/truncated.jpg", "cow/gif.jpg"]
    assert "GIF" in manifest["skipped"][1]["reason"]

    from PIL import Image

    seen, order = set(), []
    for name in names[2:]:
        for example in _records(str(out / name)):
            filename = _feature(example, "image/filename").decode()
            path = os.path.join(src, *filename.split("/"))
            label = labels[path]
            order.append(label)
            seen.add(path)
            assert _feature(example, "image/class/label") == label + 1
            assert _feature(example, "image/class/text").decode() == ["ant", "bee", "cow"][label]
            assert _feature(example, "image/format") == b"JPEG"
            data = _feature(example, "image/encoded")
            with Image.open(io.BytesIO(data)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert (_feature(example, "image/height"), _feature(example, "image/width")) == \
                    (image.size[1], image.size[0])
            if path.endswith("00.jpg"):  # an RGB JPEG: stored as it is
                assert data == open(path, "rb").read()
    assert seen == set(labels)
    assert order[:15] != sorted(order[:15])  # training records shuffled across shards


def test_same_input_same_bytes_whatever_the_workers(source_folder, tmp_path):
    src, _ = source_folder
    assert _convert(src, tmp_path / "a", "--workers", "1") == 0
    assert _convert(src, tmp_path / "b", "--workers", "2") == 0
    assert _tree(str(tmp_path / "a")) == _tree(str(tmp_path / "b"))
    # Again into the same folder: same bytes, nothing left over.
    assert _convert(src, tmp_path / "a", "--workers", "1") == 0
    assert _tree(str(tmp_path / "a")) == _tree(str(tmp_path / "b"))


def test_interrupted_conversion_never_leaves_a_complete_looking_shard(source_folder, tmp_path, monkeypatch):
    src, _ = source_folder
    complete = tmp_path / "complete"
    assert _convert(src, complete, "--workers", "1") == 0
    reference = _tree(str(complete))

    written = []

    def write_then_stop(self, payload):
        if len(written) == 8:  # inside the second training shard
            raise KeyboardInterrupt
        written.append(payload)
        self.writer.write(payload)

    monkeypatch.setattr(make_tfrecords._ShardWriter, "write", write_then_stop)
    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _convert(src, out, "--workers", "1")
    monkeypatch.undo()
    left = _tree(str(out))
    assert sorted(left) == ["train-00000-of-00003"]  # no temporary file, no manifest
    assert left["train-00000-of-00003"] == reference["train-00000-of-00003"]
    assert _convert(src, out, "--workers", "1") == 0
    assert _tree(str(out)) == reference


def test_killed_conversion_leaves_only_complete_shards(tmp_path):
    src = tmp_path / "many"
    make_class_folder(src, {"a": 40, "b": 40})
    complete = tmp_path / "complete"
    assert make_tfrecords.main(["--src", str(src), "--out", str(complete), "--shards", "8", "--quiet",
                                "--workers", "1"]) == 0
    reference = _tree(str(complete))
    out = tmp_path / "killed"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "effnet_exp.tools.make_tfrecords", "--src", str(src),
                             "--out", str(out), "--shards", "8", "--workers", "1", "--quiet"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(str(out)) and any(".tmp-" in n for n in os.listdir(str(out))):
                break  # a shard is being written
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        returncode = proc.wait()
    # Anything that looks like a result is complete and correct; the manifest (written last) only
    # with everything else. Hidden temporary files may remain.
    visible = {name: data for name, data in _tree(str(out)).items() if not name.startswith(".")}
    for name, data in visible.items():
        assert data == reference[name], name
    if "manifest.json" in visible or returncode == 0:
        assert visible == reference
    # A new run cleans up the temporary files and completes the folder.
    assert make_tfrecords.main(["--src", str(src), "--out", str(out), "--shards", "8", "--quiet",
                                "--workers", "1"]) == 0
    assert _tree(str(out)) == reference


def test_temporaries_of_a_killed_conversion_are_cleaned_up_and_nothing_else(source_folder, tmp_path):
    # What SIGKILL leaves at any moment: a hidden temporary shard, labels.txt or manifest.json (the
    # killed-process test above reaches some of these moments only by chance).
    src, _ = source_folder
    out = tmp_path / "out"
    assert _convert(src, out, "--workers", "1") == 0
    reference = _tree(str(out))
    leftovers = [".train-00001-of-00003.tmp-k1", ".validation-00000-of-00001.tmp-k2",
                 ".labels.txt.tmp-k3", ".manifest.json.tmp-k4"]
    for name in leftovers:
        (out / name).write_bytes(b"half")
    (out / ".notes.tmp-mine").write_bytes(b"the user's")
    assert _convert(src, out, "--workers", "1") == 0
    assert _tree(str(out)) == dict(reference, **{".notes.tmp-mine": b"the user's"})


def test_output_reads_through_the_tfrecord_dataset(source_folder, tmp_path):
    src, labels = source_folder
    out = tmp_path / "out"
    assert _convert(src, out, "--label-offset", "1", "--workers", "1") == 0
    cfg = DatasetConfig(data_dir=str(out), num_classes=0, label_offset=1, normalization=Normalization.unit)
    source = resolve_data_source(cfg)
    assert source.class_names == ["ant", "bee", "cow"] and source.num_classes == 3
    assert source.num_train == 15 and source.num_eval == 3
    with tf.Graph().as_default():
        dataset = pipeline.build_dataset(source, cfg, is_training=False, batch_size=8, image_size=32,
                                         normalization=cfg.normalization)
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset)
        batch = iterator.get_next()
        images, found = [], []
        with tf.compat.v1.Session() as sess:
            sess.run(iterator.initializer)
            while True:
                try:
                    x, y = sess.run(batch)
                except tf.errors.OutOfRangeError:
                    break
                images.append(x)
                found.append(y)
    found = np.concatenate(found)
    assert sorted(found.tolist()) == [0, 1, 2]
    for image, label in zip(np.concatenate(images), found):
        means = image.reshape(-1, 3).mean(axis=0)
        assert means.max() - means.min() < 0.05 or int(np.argmax(means)) == label


def test_bad_arguments_are_one_line_errors(source_folder, tmp_path, capsys):
    src, _ = source_folder
    assert make_tfrecords.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --src=") and "does not exist" in err and "\n" not in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "train-00000-of-00099").write_bytes(b"not ours")
    assert _convert(src, foreign, "--workers", "1") == 2
    err = capsys.readouterr().err.strip()
    assert "train-00000-of-00099" in err and "empty folder" in err
    assert (foreign / "train-00000-of-00099").read_bytes() == b"not ours"
    assert _convert(src, os.path.join(src, "inside")) == 2
    assert "must not be inside" in capsys.readouterr().err
