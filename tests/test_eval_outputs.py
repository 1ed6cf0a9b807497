"""What an evaluation writes besides top-1 / top-5 (issue 19): per-class metrics, confusion, calibration, a bootstrap
interval, predictions.jsonl, the figures and TensorBoard, flip test-time augmentation, the sweep report's columns.

The oracles are independent of the code under test: numbers worked out by hand for a tiny case, scikit-learn
recomputing a real run's eval.json from its predictions.jsonl, and the model run separately on an image and its
mirror."""
import csv
import glob
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as skm

from conftest import TINY, run_py
from effnet_exp.data import pipeline
from effnet_exp.data.config import DatasetConfig, Normalization
from effnet_exp.data.diagnostics import data_errors
from effnet_exp.data.preprocessing import normalize, pixels
from effnet_exp.data.records import make_example, serialize_example, write_tfrecord
from effnet_exp.data.source import DataSource, resolve_data_source
from effnet_exp.errors import UserError
from effnet_exp.inference import eval_metrics
from effnet_exp.inference.evaluator import _mistake_candidates, class_log_probabilities
from effnet_exp.inference.mistakes import ConfidentMistakes
from effnet_exp.model.config import ModelConfig
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.reporting.sweep_summary import write_report
from effnet_exp.training.config import check_eval
from factory import section
from test_image_folder import COLOURS, image_bytes, image_pixels, make_class_folder

try:
    import matplotlib  # noqa: F401  (the figures are drawn only where it is installed)
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False

NAMES = ["ant", "bee", "cat", "dog"]


# --------------------------------------------------------------------------- the hand-built case

# (label, top-1, top-1 confidence, second choice, the label's probability); "dog" is never a label nor predicted.
HAND = [(0, 0, 0.90, 1, 0.90),
        (0, 0, 0.88, 2, 0.88),
        (0, 1, 0.62, 0, 0.30),
        (1, 1, 0.70, 0, 0.70),
        (1, 0, 0.95, 2, 0.02),
        (2, 1, 0.50, 3, 0.0)]


def _hand_arrays():
    labels = np.array([h[0] for h in HAND])
    top_index = np.array([[h[1], h[3]] for h in HAND])
    top_probability = np.array([[h[2], min(h[2], 1 - h[2]) / 2] for h in HAND], np.float32)
    return eval_metrics.EvalArrays(labels, top_index, top_probability, np.array([h[4] for h in HAND], np.float32))


def test_hand_built_case_confusion_per_class_and_summary_numbers():
    fields, confusion = eval_metrics.evaluation_metrics(_hand_arrays(), NAMES)
    assert confusion.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    by_hand = [  # support, precision, recall, f1, top-k recall
        (3, 2 / 3., 2 / 3., 2 / 3., 1.0),
        (2, 1 / 3., 1 / 2., 2 * 1 / (2 + 3.), 0.5),   # f1 = 2 tp / (2 tp + fp + fn) = 2 / 5
        (1, 0.0, 0.0, 0.0, 0.0),                      # never predicted: precision 0 (zero_division=0)
        (0, 0.0, 0.0, 0.0, 0.0)]
    for entry, (index, name), expected in zip(fields["per_class"], enumerate(NAMES), by_hand):
        assert (entry["index"], entry["name"], entry["support"]) == (index, name, expected[0])
        got = (entry["precision"], entry["recall"], entry["f1"], entry["top5_recall"])
        assert got == pytest.approx(expected[1:], abs=1e-12), name
    assert fields["top1"] == pytest.approx(3 / 6.) and fields["top5"] == pytest.approx(4 / 6.)
    assert fields["balanced_accuracy"] == pytest.approx((2 / 3. + 1 / 2. + 0) / 3)  # dog has no images
    assert fields["macro_f1"] == pytest.approx((2 / 3. + 0.4 + 0) / 3)  # dog neither a label nor predicted
    nll = -(math.log(0.9) + math.log(0.88) + math.log(0.3) + math.log(0.7) + math.log(0.02) + math.log(1e-12)) / 6
    assert fields["nll"] == pytest.approx(nll, rel=1e-6)
    # 15 bins of width 1/15: 0.88 and 0.90 share bin 13 (accuracy 1, mean confidence 0.89); the others are alone.
    ece = (2 * abs(1 - 0.89) + abs(0 - 0.62) + abs(1 - 0.70) + abs(0 - 0.95) + abs(0 - 0.50)) / 6
    assert fields["ece"] == pytest.approx(ece, abs=1e-6)
    low, high = fields["top1_ci95"]
    assert 0 <= low < 0.5 < high <= 1


def test_reliability_bins_by_hand():
    arrays = _hand_arrays()
    bins = eval_metrics.reliability_bins(arrays.top_probability[:, 0], arrays.top_index[:, 0] == arrays.labels)
    assert bins.edges == pytest.approx(np.arange(16) / 15.)
    assert bins.count.tolist() == [0] * 7 + [1, 0, 1, 1, 0, 0, 2, 1]
    assert bins.accuracy[13] == 1.0 and bins.confidence[13] == pytest.approx(0.89, abs=1e-6)
    assert bins.accuracy[9] == 0.0 and bins.confidence[9] == pytest.approx(0.62, abs=1e-6)
    assert bins.accuracy[0] == bins.confidence[0] == 0.0  # empty
    # On a bin's upper edge: in that bin; 0 in the first.
    edge = eval_metrics.reliability_bins(np.array([0.0, np.linspace(0, 1, 16)[5], 1.0]), np.array([True, True, False]))
    assert np.nonzero(edge.count)[0].tolist() == [0, 4, 14]
    assert eval_metrics.expected_calibration_error(np.array([0.9, 0.9]), np.array([True, False])) == \
        pytest.approx(0.4)


def test_bootstrap_interval_is_seeded_and_matches_resampling_the_images():
    correct = np.random.RandomState(7).rand(2000) < 0.8
    interval = eval_metrics.top1_interval(correct)
    assert interval == eval_metrics.top1_interval(correct)  # seeded
    rng = np.random.RandomState(123)
    resampled = [correct[rng.randint(0, len(correct), len(correct))].mean() for _ in range(4000)]
    assert interval == pytest.approx(np.percentile(resampled, [2.5, 97.5]).tolist(), abs=0.006)
    p = correct.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(correct))
    assert interval == pytest.approx([p - half, p + half], abs=0.004)


def test_confident_mistakes_keeps_the_most_confident_and_earlier_ties():
    kept = ConfidentMistakes(3)
    assert kept.floor == -1.0
    kept.add([0, 1, 2], [0.5, 0.9, 0.7], ["a", "b", "c"])
    assert kept.floor == 0.5
    kept.add([3, 4, 5], [0.9, 0.6, 0.95], ["d", "e", "f"])
    indices, images = kept.worst()
    assert indices.tolist() == [5, 1, 3] and images.tolist() == ["f", "b", "d"]
    assert ConfidentMistakes(0).floor == 1.0  # nothing is fetched


def test_mistake_candidates_graph_fetches_only_wrong_images_above_the_floor():
    labels = np.array([0, 1, 2, 0, 1], np.int32)
    top_index = np.array([[1], [1], [0], [2], [0]], np.int32)  # images 0, 2, 3, 4 wrong
    top_probability = np.array([[0.6], [0.99], [0.8], [0.4], [0.9]], np.float32)
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    with tf.Graph().as_default():
        floor = tf.compat.v1.placeholder(tf.float32, [])
        positions, picked = _mistake_candidates(tf.constant(images), tf.constant(labels), tf.constant(top_index),
                                                tf.constant(top_probability), floor, 2)
        with tf.compat.v1.Session() as sess:
            got = sess.run([positions, picked], {floor: 0.5})
            empty = sess.run(positions, {floor: 0.95})
    assert got[0].tolist() == [4, 2] and got[1][:, 0, 0, 0].tolist() == [4.0, 2.0]
    assert empty.tolist() == []


def test_pixels_undo_every_normalisation():
    image = np.random.RandomState(0).randint(0, 256, size=(2, 5, 4, 3)).astype(np.uint8)
    with tf.Graph().as_default():
        normalised = {mode: normalize(tf.constant(image), mode) for mode in Normalization}
        with tf.compat.v1.Session() as sess:
            values = sess.run(normalised)
    for mode, value in values.items():
        restored = pixels(value, mode)
        assert restored.dtype == np.uint8 and np.array_equal(restored, image), mode


def test_bad_eval_settings_are_user_errors():
    with pytest.raises(UserError, match=r"eval.mistakes=-1 must be >= 0"):
        check_eval(section("eval", "eval.mistakes=-1"))
    cfg = section("eval")
    assert (cfg.save_predictions, cfg.flip_tta, cfg.mistakes) == (False, False, 24)


# --------------------------------------------------------------------------- sources from the pipeline


def _read(source, cfg, with_sources, batch_size=3):
    graph = tf.Graph()
    with graph.as_default():
        dataset = pipeline.build_dataset(source, cfg, is_training=False, batch_size=batch_size, image_size=24,
                                         normalization=cfg.normalization, with_sources=with_sources)
        batch = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()
        out = []
        with tf.compat.v1.Session() as sess, data_errors(cfg):
            while True:
                try:
                    out.append(sess.run(batch))
                except tf.errors.OutOfRangeError:
                    return out


def _record(i, image=None):
    data = image_bytes(image_pixels(30 + i, 40, COLOURS[i % 3], i)) if image is None else image
    return serialize_example(make_example(data, i, filename="img{}".format(i)))


def test_sources_of_tfrecords_name_the_file_and_record_even_past_a_skipped_one(tmp_path):
    first, second = str(tmp_path / "validation-00000-of-00002"), str(tmp_path / "validation-00001-of-00002")
    # Record 1 of the first file is no image: skipped, and the sources after it stay with their labels.
    write_tfrecord(first, [_record(0), _record(1, image=b"\xff\xd8\xff\xe0" + b"\x13" * 100), _record(2),
                           _record(3)])
    write_tfrecord(second, [_record(10), _record(11), _record(12)])
    cfg = DatasetConfig(num_classes=13, normalization=Normalization.unit, cycle_length=2, num_parallel_calls=2,
                        prefetch=1, skip_bad_records=True)
    source = DataSource(str(tmp_path), [], [first, second], None, None, None)
    batches = _read(source, cfg, with_sources=True)
    labels = np.concatenate([b[1] for b in batches]).tolist()
    sources = [s.decode() for b in batches for s in b[2]]
    where = {0: (first, 0), 2: (first, 2), 3: (first, 3), 10: (second, 0), 11: (second, 1), 12: (second, 2)}
    assert sorted(labels) == sorted(where)
    assert sources == ["{}:{}".format(*where[label]) for label in labels]
    assert all(b[0].shape[1:] == (24, 24, 3) for b in batches)
    plain = _read(source, cfg, with_sources=False)
    assert all(len(b) == 2 for b in plain)  # the default output is unchanged
    assert np.concatenate([b[1] for b in plain]).tolist() == labels


def test_sources_of_an_image_folder_are_the_file_paths(tmp_path):
    make_class_folder(tmp_path, {"a": 5, "b": 5, "c": 5})
    cfg = DatasetConfig(root=str(tmp_path), num_classes=0, normalization=Normalization.unit, val_fraction=0.4,
                        num_parallel_calls=2, prefetch=1)
    source = resolve_data_source(cfg)
    batches = _read(source, cfg, with_sources=True, batch_size=4)
    assert [s.decode() for b in batches for s in b[2]] == [p for p, _ in source.eval_items]
    assert np.concatenate([b[1] for b in batches]).tolist() == [l for _, l in source.eval_items]


# --------------------------------------------------------------------------- flip test-time augmentation


def _tiny_checkpoint(folder, cfg):
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(0)
        build_efficientnet(tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3]), cfg, is_training=False)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return tf.compat.v1.train.Saver().save(sess, os.path.join(folder, "model.ckpt"))


def _probabilities(prefix, cfg, images, flip_tta):
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3])
        model, log_p = class_log_probabilities(x, cfg, prefix, use_ema=True, flip_tta=flip_tta)
        with tf.compat.v1.Session() as sess:
            model.restore(sess)
            return sess.run(tf.exp(log_p), {x: images})


def test_flip_tta_averages_the_probabilities_of_each_image_and_its_mirror(tmp_path):
    cfg = ModelConfig(name="efficientnet-b0", num_classes=5, image_size=32, head_filters=64,
                      blocks=["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25"])
    prefix = _tiny_checkpoint(str(tmp_path), cfg)
    rng = np.random.RandomState(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    images[:, :, :16] += 2.0  # the left half brighter: an image and its mirror differ
    own = _probabilities(prefix, cfg, images, flip_tta=False)
    mirrored = _probabilities(prefix, cfg, images[:, :, ::-1, :], flip_tta=False)
    assert np.abs(own - mirrored).max() > 1e-3  # the check below can fail
    averaged = _probabilities(prefix, cfg, images, flip_tta=True)
    assert averaged == pytest.approx((own + mirrored) / 2, abs=1e-6)


# --------------------------------------------------------------------------- the sweep report


def test_sweep_report_has_the_interval_and_balanced_accuracy(tmp_path):
    for job, (top1, low, high, balanced) in enumerate([(0.85, 0.8, 0.9, 0.83), (0.75, 0.7, 0.8, 0.7)]):
        folder = tmp_path / str(job) / ".hydra"
        folder.mkdir(parents=True)
        (folder / "overrides.yaml").write_text("- optimizer.lr={}\n".format(job + 1))
        (tmp_path / str(job) / "eval.json").write_text(json.dumps(
            {"top1": top1, "top5": 1.0, "top1_ci95": [low, high], "balanced_accuracy": balanced, "step": 4}))
    write_report(str(tmp_path), figure=False)
    with open(str(tmp_path / "summary.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["top1_ci95_low"], r["top1_ci95_high"], r["balanced_accuracy"]) for r in rows] == \
        [("0.800000", "0.900000", "0.830000"), ("0.700000", "0.800000", "0.700000")]
    md = (tmp_path / "summary.md").read_text()
    assert "| 0.8500 | [0.8000, 0.9000] | 1.0000 | 0.8300 |" in md
    assert "top-1 95% CI" in md and "balanced accuracy" in md


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, cache_dir):
    """train_eval on the bundled digits, with predictions.jsonl."""
    cwd = tmp_path_factory.mktemp("eval_user")
    run_dir = str(cwd / "run")
    proc = run_py(TINY + ["eval.save_predictions=true", "eval.flip_tta=false", "hydra.run.dir=" + run_dir],
                  cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, run_dir


def _predictions(run_dir):
    with open(os.path.join(run_dir, "predictions.jsonl")) as f:
        return [json.loads(line) for line in f]


def _ece_by_hand(confidence, correct, bins=15):
    total = 0.0
    for b in range(bins):
        inside = [(c, k) for c, k in zip(confidence, correct) if b / bins < c <= (b + 1) / bins or (b == 0 and c == 0)]
        if inside:
            total += len(inside) / len(confidence) * abs(np.mean([k for _, k in inside]) -
                                                         np.mean([c for c, _ in inside]))
    return total


def test_eval_json_equals_scikit_learn_on_predictions_jsonl(evaluated_run):
    proc, run_dir = evaluated_run
    result = json.load(open(os.path.join(run_dir, "eval.json")))
    lines = _predictions(run_dir)
    assert [p["index"] for p in lines] == list(range(result["num_images"]))
    labels = np.array([p["label"] for p in lines])
    predicted = np.array([p["top5"][0]["index"] for p in lines])
    classes = list(range(10))
    names = [str(c) for c in classes]

    with open(os.path.join(run_dir, "confusion.csv")) as f:
        table = list(csv.reader(f))
    assert table[0] == [""] + names and [row[0] for row in table[1:]] == names
    assert np.array([[int(v) for v in row[1:]] for row in table[1:]]).tolist() == \
        skm.confusion_matrix(labels, predicted, labels=classes).tolist()

    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                         zero_division=0)
    top5 = np.array([p["label"] in [t["index"] for t in p["top5"]] for p in lines])
    for c, entry in enumerate(result["per_class"]):
        assert (entry["index"], entry["name"], entry["support"]) == (c, names[c], support[c])
        assert [entry["precision"], entry["recall"], entry["f1"]] == pytest.approx(
            [precision[c], recall[c], f1[c]], abs=1e-12)
        assert entry["top5_recall"] == pytest.approx(top5[labels == c].mean(), abs=1e-12)
    assert result["top1"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=1e-12)
    assert result["top5"] == pytest.approx(top5.mean(), abs=1e-12)
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted), abs=1e-12)
    assert result["macro_f1"] == pytest.approx(skm.f1_score(labels, predicted, average="macro", zero_division=0),
                                               abs=1e-12)
    # The mean -log p(true class) as a binary log loss: every image "is" its true class, with that probability.
    p_true = np.array([p["label_probability"] for p in lines])
    assert p_true.min() > 1e-12  # the clip does not come into it
    assert result["nll"] == pytest.approx(skm.log_loss(np.ones(len(p_true)), p_true, labels=[0, 1]), rel=1e-9)
    assert result["loss"] == pytest.approx(result["nll"], rel=1e-5)  # the graph's cross-entropy, the same number
    confidence = np.array([p["top5"][0]["probability"] for p in lines])
    assert result["ece"] == pytest.approx(_ece_by_hand(confidence, predicted == labels), abs=1e-9)
    low, high = result["top1_ci95"]
    assert low <= result["top1"] <= high and high - low > 0
    assert result["flip_tta"] is False


def test_predictions_jsonl_lines_name_their_records(evaluated_run):
    _, run_dir = evaluated_run
    lines = _predictions(run_dir)
    assert list(lines[0]) == ["index", "source", "label", "label_probability", "top5"]
    places = [p["source"].rsplit(":", 1) for p in lines]
    assert len({p["source"] for p in lines}) == len(lines)
    for path, index in places:
        assert os.path.isfile(path) and "validation" in os.path.basename(path) and int(index) >= 0
    for p in lines:
        probabilities = [t["probability"] for t in p["top5"]]
        assert len(p["top5"]) == 5 and probabilities == sorted(probabilities, reverse=True)
        for t in p["top5"]:
            if t["index"] == p["label"]:
                assert t["probability"] == p["label_probability"]


def test_console_figures_and_tensorboard(evaluated_run):
    proc, run_dir = evaluated_run
    result = json.load(open(os.path.join(run_dir, "eval.json")))
    assert "eval top1 {:.4f} [95% CI {:.4f}, {:.4f}] balanced accuracy {:.4f}".format(
        result["top1"], result["top1_ci95"][0], result["top1_ci95"][1], result["balanced_accuracy"]) in proc.stdout
    for name in ("confusion.png", "reliability.png", "mistakes.png"):
        path = os.path.join(run_dir, name)
        assert os.path.isfile(path) == HAVE_MATPLOTLIB, name
        if HAVE_MATPLOTLIB:
            assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not glob.glob(os.path.join(run_dir, ".*.tmp"))
    scalars, images = {}, set()
    for events in glob.glob(os.path.join(run_dir, "tensorboard", "eval", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(events):
            for value in event.summary.value:
                if value.HasField("image"):
                    images.add(value.tag)
                else:
                    scalars[value.tag] = value.simple_value
    for entry in result["per_class"]:
        assert scalars["recall/" + entry["name"]] == pytest.approx(entry["recall"], abs=1e-6)
    for key in ("top1", "balanced_accuracy", "macro_f1", "nll", "ece"):
        assert scalars[key] == pytest.approx(result[key], rel=1e-6)
    assert images == ({"confusion"} if HAVE_MATPLOTLIB else set())


def test_flip_tta_and_no_mistakes_in_mode_eval(evaluated_run, tmp_path, cache_dir):
    _, trained = evaluated_run
    out = str(tmp_path / "tta")
    proc = run_py(TINY + ["mode=eval", "eval.checkpoint=" + trained, "eval.flip_tta=true", "eval.mistakes=0",
                          "hydra.run.dir=" + out], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(os.path.join(out, "eval.json")))
    plain = json.load(open(os.path.join(trained, "eval.json")))
    assert result["flip_tta"] is True and result["num_images"] == plain["num_images"]
    assert result["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # other probabilities
    assert open(os.path.join(out, "run.log")).read().count("eval.flip_tta=true") == 1
    assert not os.path.exists(os.path.join(out, "mistakes.png"))
    assert not os.path.exists(os.path.join(out, "predictions.jsonl"))
    assert os.path.isfile(os.path.join(out, "confusion.csv"))
