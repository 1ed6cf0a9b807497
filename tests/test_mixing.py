"""MixUp / CutMix (train.mixup_alpha, train.cutmix_alpha, train.mix_switch_prob) and class weights
(train.class_weights), on real graphs against independent oracles (numpy, scipy.stats, scikit-learn, timm's box
rule written out in numpy), and in real runs of run.py: mixing with balanced weights end to end, mixing under a
tf.distribute strategy resumed from a checkpoint as if never stopped, and a bad weight list stopping the run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from sklearn.utils.class_weight import compute_class_weight

from conftest import RUN_PY, TINY, run_py
from effnet_exp.data.bundled import prepare_builtin
from effnet_exp.data.source import resolve_data_source
from effnet_exp.devices.placement import SINGLE, Placement
from effnet_exp.errors import UserError
from effnet_exp.training import mixing
from effnet_exp.training.class_weights import resolve_class_weights
from effnet_exp.training.config import TrainConfig, check_train
from effnet_exp.training.metrics import cross_entropy, soft_cross_entropy
from factory import run_config, section

IMAGES = np.random.RandomState(0).normal(size=(6, 8, 10, 3)).astype(np.float32)  # H != W on purpose
LABELS = np.array([0, 3, 1, 4, 2, 3], np.int32)
CLASSES = 5


class MixGraph(object):
    """mix_batch of IMAGES / LABELS for a step fed at run time: (run seed, replica) fixed per graph."""

    def __init__(self, train_cfg, run_seed=0, replica=0, graph_seed=None):
        self.graph = tf.Graph()
        with self.graph.as_default():
            if graph_seed is not None:
                tf.compat.v1.set_random_seed(graph_seed)  # stateless draws must not care
            self.step = tf.compat.v1.placeholder(tf.int64, [])
            seed = mixing.mix_seed(run_seed, self.step, tf.constant(replica, tf.int64))
            self.mixed = mixing.mix_batch(tf.constant(IMAGES), tf.constant(LABELS), CLASSES, train_cfg, seed)
        self.sess = tf.compat.v1.Session(graph=self.graph)

    def at(self, step):
        return self.sess.run(self.mixed._asdict(), {self.step: step})

    def lams(self, steps):
        return np.array([self.sess.run(self.mixed.lam, {self.step: s}) for s in steps], np.float64)


def one_hot(labels):
    return np.eye(CLASSES)[labels]


def test_mixup_blends_images_and_targets_with_the_returned_lambda():
    graph = MixGraph(TrainConfig(mixup_alpha=0.4))
    partner = IMAGES[::-1]
    dominant_own = []
    for step in range(12):
        out = graph.at(step)
        lam = float(out["lam"])
        assert not out["use_cutmix"] and 0.0 <= lam <= 1.0
        np.testing.assert_allclose(out["images"], lam * IMAGES + (1 - lam) * partner, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["targets"], lam * one_hot(LABELS) + (1 - lam) * one_hot(LABELS[::-1]),
                                   atol=1e-6)
        np.testing.assert_allclose(out["targets"].sum(axis=1), 1.0, atol=1e-6)
        # The train top-1 counts against the label weighing >= 0.5: the image's own, or its partner's.
        np.testing.assert_array_equal(out["labels"], LABELS if lam >= 0.5 else LABELS[::-1])
        dominant_own.append(lam >= 0.5)
    assert any(dominant_own) and not all(dominant_own)  # both cases were seen


def _timm_effective_lams(alpha, height, width, count, seed=1):
    """timm's CutMix (rand_bbox, then lambda corrected to the clipped box), in numpy: the oracle's distribution."""
    rng = np.random.RandomState(seed)
    lam = rng.beta(alpha, alpha, size=count)
    cut_h, cut_w = (height * np.sqrt(1 - lam)).astype(int), (width * np.sqrt(1 - lam)).astype(int)
    cy, cx = rng.randint(0, height, size=count), rng.randint(0, width, size=count)
    y0, y1 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x0, x1 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return 1 - (y1 - y0) * (x1 - x0) / float(height * width)


def test_cutmix_pastes_the_partner_box_and_corrects_lambda_to_its_area():
    graph = MixGraph(TrainConfig(cutmix_alpha=1.0))
    height, width = IMAGES.shape[1:3]
    partner = IMAGES[::-1]
    lams, clipped = [], 0
    for step in range(600):
        out = graph.at(step)
        y0, y1, x0, x1 = out["box"]
        lams.append(float(out["lam"]))
        assert out["use_cutmix"] and 0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width
        if step >= 40:
            continue  # the pixel checks on the first steps, the distribution on all
        inside = np.zeros((height, width), bool)
        inside[y0:y1, x0:x1] = True
        np.testing.assert_array_equal(out["images"][:, inside], partner[:, inside])
        np.testing.assert_array_equal(out["images"][:, ~inside], IMAGES[:, ~inside])
        area = (y1 - y0) * (x1 - x0)
        assert out["lam"] == pytest.approx(1 - area / float(height * width), abs=1e-6)
        np.testing.assert_allclose(out["targets"], out["lam"] * one_hot(LABELS) + (1 - out["lam"]) *
                                   one_hot(LABELS[::-1]), atol=1e-6)
        np.testing.assert_allclose(out["targets"].sum(axis=1), 1.0, atol=1e-6)
        clipped += int(area > 0 and (y0 == 0 or x0 == 0 or y1 == height or x1 == width))
    assert clipped > 0
    # The effective lambdas follow timm's rule for Beta(1, 1) lambdas and uniform box centres. (Their values are box
    # areas, taken with the same rounding on both sides: a float32 0.7 is not a float64 0.7.)
    lams = np.round(lams, 5)
    oracle = np.round(_timm_effective_lams(1.0, height, width, 50000), 5)
    assert stats.ks_2samp(lams, oracle).pvalue > 0.01
    assert stats.ks_2samp(lams, np.round(_timm_effective_lams(3.0, height, width, 50000), 5)).pvalue < 1e-3  # it can tell


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_matches_scipy_beta(alpha):
    """MixUp's lambda is Beta(alpha, alpha), drawn from stateless uniforms (Marsaglia-Tsang gammas): a
    Kolmogorov-Smirnov test against scipy.stats.beta, at fixed seeds, that rejects a neighbouring alpha."""
    lams = MixGraph(TrainConfig(mixup_alpha=alpha), run_seed=11).lams(range(1500))
    assert stats.kstest(lams, "beta", args=(alpha, alpha)).pvalue > 0.01
    assert stats.kstest(lams, "beta", args=(2 * alpha, 2 * alpha)).pvalue < 1e-3


def test_switch_between_mixup_and_cutmix_per_batch():
    for prob, low, high in ((0.0, 0, 0), (0.3, 0.2, 0.4), (1.0, 1, 1)):
        graph = MixGraph(TrainConfig(mixup_alpha=0.2, cutmix_alpha=1.0, mix_switch_prob=prob))
        cut = np.mean([graph.sess.run(graph.mixed.use_cutmix, {graph.step: s}) for s in range(300)])
        assert low <= cut <= high, (prob, cut)


def test_same_seed_step_and_replica_mix_the_same_way():
    """What a resumed run relies on: the mixing of a step depends only on (run seed, global step, replica), not on
    the graph, the session, the graph-level seed or the steps run before."""
    cfg = TrainConfig(mixup_alpha=0.3, cutmix_alpha=1.0)
    first = MixGraph(cfg, graph_seed=1)
    again = MixGraph(cfg, graph_seed=2)
    for _ in range(3):
        first.at(0)  # steps run before do not matter
    runs = {name: g.at(7) for name, g in (("first", first), ("again", again))}
    for key in ("images", "targets", "lam", "box", "use_cutmix", "labels"):
        np.testing.assert_array_equal(runs["first"][key], runs["again"][key], err_msg=key)
    others = [first.at(8), MixGraph(cfg, replica=1).at(7), MixGraph(cfg, run_seed=1).at(7)]
    for other in others:  # another step, replica or run seed: other draws
        assert other["lam"] != runs["first"]["lam"]


def test_replica_index_of_processes_and_local_replicas():
    with tf.Graph().as_default():
        ranks = [Placement(replicas=4, processes=4, rank=r, chief=r == 0, input_shards=4, input_shard=r, folder=None)
                 for r in range(4)]  # Ascend ranks: one replica per process
        workers = Placement(replicas=4, processes=2, rank=1, chief=False, input_shards=1, input_shard=0, folder=None)
        indices = [mixing.replica_index(p) for p in [SINGLE] + ranks + [workers]]
        with tf.compat.v1.Session() as sess:
            assert sess.run(indices) == [0, 0, 1, 2, 3, 2]


# In a fresh process (its logical CPU devices must exist before TensorFlow starts): the replica index and lambda of
# each replica of a mirrored strategy on two CPU devices.
_MIRRORED_PROBE = """
import json
import tensorflow as tf
from effnet_exp.devices.config import CpuDeviceConfig, Strategy
from effnet_exp.devices.factory import make_device
from effnet_exp.training import mixing
from effnet_exp.training.config import TrainConfig

device = make_device(CpuDeviceConfig(strategy=Strategy.mirrored, replicas=2))
graph = tf.Graph()
with graph.as_default():
    replicas = device.replicas()
with graph.as_default(), replicas.scope():
    def replica_fn():
        index = mixing.replica_index(device.placement)
        mixed = mixing.mix_batch(tf.zeros([4, 8, 8, 3]), tf.range(4), 4, TrainConfig(mixup_alpha=1.0),
                                 mixing.mix_seed(0, tf.constant(5, tf.int64), index))
        return index, mixed.lam

    run = replicas.strategy.run if hasattr(replicas.strategy, "run") else replicas.strategy.experimental_run_v2
    outputs = [replicas.strategy.experimental_local_results(t) for t in run(replica_fn)]
with replicas.session(graph, tf.compat.v1.ConfigProto()) as sess:
    indices, lams = sess.run(outputs)
print(json.dumps({"indices": [int(i) for i in indices], "lams": [float(l) for l in lams]}))
"""


def test_each_mirrored_replica_mixes_with_its_own_draws(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.path.dirname(RUN_PY))
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_PROBE], cwd=str(tmp_path), env=env, timeout=300,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["indices"] == [0, 1]
    expected = [MixGraph(TrainConfig(mixup_alpha=1.0), replica=r).lams([5])[0] for r in (0, 1)]
    # The lambda of replica r is the one of (seed 0, step 5, replica r) built anywhere else.
    assert seen["lams"] == pytest.approx(expected, abs=1e-6) and expected[0] != expected[1]


def _numpy_cross_entropy(logits, targets, smoothing, weights=None):
    classes = targets.shape[1]
    smoothed = targets * (1 - smoothing) + smoothing / classes
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - \
        logits.max(1, keepdims=True)
    losses = -(smoothed * log_p).sum(1)
    per_image = (targets @ weights) if weights is not None else np.ones(len(targets))
    return (per_image * losses).sum() / len(targets)  # Keras: sum(w_i l_i) / N


def test_weighted_soft_cross_entropy_equals_numpy():
    rng = np.random.RandomState(3)
    logits = rng.normal(size=(6, CLASSES)) * 3
    lam = 0.3
    targets = lam * one_hot(LABELS) + (1 - lam) * one_hot(LABELS[::-1])
    weights = np.array([0.5, 2.0, 1.0, 3.0, 0.0])
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        got = sess.run([soft_cross_entropy(tf.constant(logits, tf.float32), tf.constant(targets, tf.float32), 0.1,
                                           tf.constant(weights, tf.float32)),
                        soft_cross_entropy(tf.constant(logits, tf.float32), tf.constant(targets, tf.float32)),
                        cross_entropy(tf.constant(logits, tf.float32), tf.constant(LABELS), CLASSES, 0.2)])
    assert got[0] == pytest.approx(_numpy_cross_entropy(logits, targets, 0.1, weights), rel=1e-5)
    assert got[1] == pytest.approx(_numpy_cross_entropy(logits, targets, 0.0), rel=1e-5)
    assert got[2] == pytest.approx(_numpy_cross_entropy(logits, one_hot(LABELS), 0.2), rel=1e-5)


def _write_fake_images(folder, count):
    os.makedirs(folder)
    for i in range(count):
        with open(os.path.join(folder, "{}.png".format(i)), "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n")  # the weights need the file list only


def _balanced(dataset_section, **train):
    source = resolve_data_source(dataset_section, need_eval=False)
    return resolve_class_weights(TrainConfig(class_weights="balanced", **train), source, dataset_section,
                                 source.num_classes or dataset_section.num_classes, source.class_names)


def test_balanced_weights_equal_scikit_learn_for_an_image_folder(tmp_path):
    counts = {"ant": 5, "bee": 1, "cat": 3}
    for name, count in counts.items():
        _write_fake_images(str(tmp_path / "train" / name), count)
        _write_fake_images(str(tmp_path / "val" / name), 1)
    labels = np.repeat(np.arange(3), [5, 1, 3])
    weights = _balanced(section("dataset", "dataset=image_folder", "dataset.root=" + str(tmp_path)))
    assert weights == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=labels).tolist())


@pytest.fixture(scope="module")
def digits_labels(cache_dir):
    """The digits' data folder and the labels of its training records, read here with TensorFlow's parser."""
    data_dir = prepare_builtin("digits", cache_dir)["data_dir"]
    labels = []
    for name in sorted(os.listdir(data_dir)):
        if name.startswith("train-"):
            for payload in tf.compat.v1.io.tf_record_iterator(os.path.join(data_dir, name)):
                example = tf.train.Example.FromString(payload)
                labels.append(example.features.feature["image/class/label"].int64_list.value[0])
    return data_dir, np.array(labels)


def test_balanced_weights_equal_scikit_learn_from_a_manifest_and_from_a_pass_over_records(tmp_path, digits_labels,
                                                                                         caplog):
    data_dir, labels = digits_labels
    oracle = compute_class_weight("balanced", classes=np.arange(10), y=labels).tolist()
    assert len(set(np.round(oracle, 6))) > 1  # the classes are not all the same size
    with caplog.at_level("INFO"):
        from_manifest = _balanced(section("dataset"))
    assert "manifest.json" in caplog.text and "counting the labels" not in caplog.text
    assert from_manifest == pytest.approx(oracle)
    # The same shards without manifest.json: the labels are counted in one pass over the records.
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(data_dir):
        if name.startswith(("train-", "validation-")):
            os.symlink(os.path.join(data_dir, name), str(bare / name))
    caplog.clear()
    with caplog.at_level("INFO"):
        counted = _balanced(section("dataset", "dataset=tfrecord", "dataset.data_dir=" + str(bare),
                                    "dataset.num_classes=10"))
    assert "counting the labels of the training records" in caplog.text
    assert counted == pytest.approx(oracle)
    # One class more than the data has: that class has no training images.
    with pytest.raises(UserError, match=r"train.class_weights=balanced: class 10 has no training images"):
        _balanced(section("dataset", "dataset=tfrecord", "dataset.data_dir=" + str(bare), "dataset.num_classes=11"))


def test_class_weight_settings_and_their_errors():
    # A list is checked against the class count only (no data source is read).
    assert resolve_class_weights(TrainConfig(class_weights=[1, 2.5, 0]), None, None, 3) == [1.0, 2.5, 0.0]
    assert resolve_class_weights(TrainConfig(), None, None, 3) is None
    with pytest.raises(UserError, match=r"train.class_weights=\[1, 2\] has 2 weights but the model has 3 classes"):
        resolve_class_weights(TrainConfig(class_weights=[1, 2]), None, None, 3)
    for bad in ("balance", [1, -1], [0, 0], [], 2, [1, "a"], [True, 1]):
        with pytest.raises(UserError) as err:
            check_train(TrainConfig(class_weights=bad))
        assert str(err.value).startswith("train.class_weights={} must be none, balanced or a list".format(bad))
    for cfg, key in ((TrainConfig(mixup_alpha=-0.1), "train.mixup_alpha=-0.1"),
                     (TrainConfig(cutmix_alpha=float("inf")), "train.cutmix_alpha=inf"),
                     (TrainConfig(mix_switch_prob=1.5), "train.mix_switch_prob=1.5")):
        with pytest.raises(UserError, match=key):
            check_train(cfg)
    # Hydra takes a string or a list for the one field.
    assert run_config("train.class_weights=balanced").train.class_weights == "balanced"
    assert run_config("train.class_weights=[1,2.5]").train.class_weights == [1, 2.5]
    assert run_config().train.class_weights == "none"


def test_mixup_with_balanced_weights_and_autoaugment_runs_end_to_end(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["train.mixup_alpha=0.2", "train.class_weights=balanced", "train.label_smoothing=0.1",
                          "dataset.augment=autoaugment", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (run_dir / "run.log").read_text()
    assert "training images augmented by autoaugment (policy v0; pixel constants x 32/224)" in log_text
    assert log_text.count("class weights (train.class_weights=balanced") == 1
    assert "mixing each replica's batch with itself reversed: MixUp with lambda ~ Beta(0.2, 0.2)" in log_text
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["top1"] <= 1 for r in records)
    assert json.load(open(str(run_dir / "eval.json")))["step"] == 4


# Lite0 cut to its first blocks, no dropout or drop-connect (their masks are fresh draws after a resume).
MIRRORED_MIXING = TINY + ["model.blocks=[r1_k3_s11_e1_i32_o16,r2_k3_s22_e6_i16_o24]", "model.pretrained=null",
                          "model.dropout_rate=0", "model.survival_prob=1.0", "mode=train", "train.steps=3",
                          "train.log_every=1", "train.checkpoint_every=2", "device.strategy=mirrored",
                          "device.replicas=2", "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "seed=5",
                          "dataset.augment=randaugment"]


def test_mixing_under_mirrored_resumes_as_if_never_stopped(tmp_path, cache_dir):
    """Both mixings and RandAugment under a two-replica strategy for 3 steps; then the run folder as a crash after
    step 2 left it, resumed by the same command: step 3 augments and mixes the same way (same loss, top-1 and
    weights)."""
    whole = tmp_path / "whole"
    proc = run_py(MIRRORED_MIXING + ["hydra.run.dir=" + str(whole)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    shutil.copytree(str(whole), str(resumed))
    checkpoints = str(resumed / "checkpoints")
    for name in os.listdir(checkpoints):
        if name.startswith("model.ckpt-3"):
            os.remove(os.path.join(checkpoints, name))
    tf.compat.v1.train.update_checkpoint_state(checkpoints, "model.ckpt-2", ["model.ckpt-2"])
    proc = run_py(MIRRORED_MIXING + ["hydra.run.dir=" + str(resumed)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from " + os.path.join(checkpoints, "model.ckpt-2") in (resumed / "run.log").read_text()

    def step3(run_dir):
        return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]

    want, got = step3(whole), step3(resumed)
    assert got["step"] == want["step"] == 3
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["top1"] == want["top1"]
    readers = [tf.compat.v1.train.NewCheckpointReader(str(d / "checkpoints" / "model.ckpt-3"))
               for d in (whole, resumed)]
    for name in readers[0].get_variable_to_shape_map():
        np.testing.assert_allclose(readers[1].get_tensor(name), readers[0].get_tensor(name), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_a_weight_list_of_the_wrong_length_is_one_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["train.class_weights=[1,2,3]", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "train.class_weights=[1, 2, 3] has 3 weights but the model has 10 classes" in line
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints").exists()
