"""model.pretrained: strict, name-based restore of official-style checkpoints (raw + EMA shadows)."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, run_py
from effnet_exp.errors import UserError
from effnet_exp.model.config import ModelConfig
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.pretrained import ensure_imported
from effnet_exp.model.restore import InferenceModel, WeightsPlan, checkpoint_num_classes, model_variables

SMALL_BLOCKS = ["r1_k3_s11_e1_i32_o16_se0.25", "r1_k3_s22_e6_i16_o24_se0.25"]


def small_model(num_classes, name="efficientnet-b0"):
    return ModelConfig(name=name, blocks=list(SMALL_BLOCKS), num_classes=num_classes)


def model_arrays(cfg, seed=0):
    """The variables of cfg's model with their initial values, as {name: ndarray}."""
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(seed)
        build_efficientnet(tf.zeros([1, 32, 32, 3]), cfg, is_training=True)
        variables = model_variables(cfg.name)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return dict(zip([v.op.name for v in variables], sess.run(variables)))


def write_checkpoint(prefix, arrays):
    """A checkpoint holding exactly these tensors, written without any model graph."""
    with tf.Graph().as_default():
        variables = {name: tf.compat.v1.Variable(value, name="v%d" % i)
                     for i, (name, value) in enumerate(sorted(arrays.items()))}
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver(variables).save(sess, prefix, write_meta_graph=False)
    return prefix


def official_like(tmp_path, num_classes=1000):
    """Raw weights, EMA shadows (raw + 1), a global step and an optimizer slot, like the released tarballs."""
    raw = model_arrays(small_model(num_classes))
    arrays = dict(raw)
    arrays.update({k + "/ExponentialMovingAverage": v + 1.0 for k, v in raw.items()})
    arrays["global_step"] = np.array(1000, np.int64)
    arrays["efficientnet-b0/head/dense/kernel/RMSProp"] = np.ones_like(raw["efficientnet-b0/head/dense/kernel"])
    return raw, write_checkpoint(str(tmp_path / "model.ckpt"), arrays)


def restored(cfg, prefix, weights="ema", allow_new_head=False):
    with tf.Graph().as_default():
        build_efficientnet(tf.zeros([1, 32, 32, 3]), cfg, is_training=False)
        variables = model_variables(cfg.name)
        plan = WeightsPlan(prefix, variables, cfg.name, weights, allow_new_head=allow_new_head)
        saver = plan.saver()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.restore(sess, prefix)
            return plan, dict(zip([v.op.name for v in variables], sess.run(variables)))


def test_ema_shadows_by_default_raw_on_request(tmp_path):
    raw, prefix = official_like(tmp_path)
    assert not os.path.exists(prefix + ".meta")  # nothing relies on a meta graph
    plan, values = restored(small_model(1000), prefix)
    assert plan.uses_ema and "EMA" in plan.describe()
    assert len(values) == len(raw)
    for name, value in values.items():
        np.testing.assert_array_equal(value, raw[name] + 1.0, err_msg=name)
    plan, values = restored(small_model(1000), prefix, weights="raw")
    assert not plan.uses_ema
    for name, value in values.items():
        np.testing.assert_array_equal(value, raw[name], err_msg=name)


def test_inference_model_restores_ema_or_raw_and_shares_them_with_its_towers(tmp_path):
    raw, prefix = official_like(tmp_path)
    cfg = small_model(1000)
    x = np.random.RandomState(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    outputs = {}
    for use_ema in (True, False):
        with tf.Graph().as_default() as graph:
            images = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3])
            model = InferenceModel(images, cfg, prefix, use_ema=use_ema)
            with tf.compat.v1.name_scope("second"):
                second = model.tower(images * 1.0)
            assert model.plan.uses_ema == use_ema and ("EMA" in model.describe()) == use_ema
            assert sorted(model.endpoints) and model.endpoints["logits"] is model.logits
            assert len(model_variables(cfg.name)) == len(raw)  # the tower made no variables of its own
            assert len([op for op in graph.get_operations() if op.type in ("RestoreV2", "SaveV2")]) == 2  # one saver
            assert not graph.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)  # inference batch norm
            graph.finalize()
            with tf.compat.v1.Session(graph=graph) as sess:
                model.restore(sess)
                values = dict(zip([v.op.name for v in model_variables(cfg.name)],
                                  sess.run(model_variables(cfg.name))))
                outputs[use_ema] = sess.run([model.logits, second], {images: x})
        for name, value in values.items():
            np.testing.assert_array_equal(value, raw[name] + (1.0 if use_ema else 0.0), err_msg=name)
        np.testing.assert_array_equal(outputs[use_ema][0], outputs[use_ema][1])
    assert np.max(np.abs(outputs[True][0] - outputs[False][0])) > 1e-3


def test_new_head_when_class_count_differs(tmp_path):
    raw, prefix = official_like(tmp_path)
    assert checkpoint_num_classes(prefix, "efficientnet-b0") == 1000
    with pytest.raises(UserError) as err:
        restored(small_model(10), prefix)
    assert "head/dense/kernel" in str(err.value) and "[1280, 1000]" in str(err.value)
    plan, values = restored(small_model(10), prefix, allow_new_head=True)
    assert sorted(v.op.name for v in plan.fresh) == ["efficientnet-b0/head/dense/bias",
                                                     "efficientnet-b0/head/dense/kernel"]
    assert "freshly initialised" in plan.describe()
    np.testing.assert_array_equal(values["efficientnet-b0/stem/conv2d/kernel"],
                                  raw["efficientnet-b0/stem/conv2d/kernel"] + 1.0)
    assert values["efficientnet-b0/head/dense/kernel"].shape == (1280, 10)


def test_strict_errors_list_what_is_missing(tmp_path):
    raw, _ = official_like(tmp_path)
    partial = {k: v for k, v in raw.items() if "blocks_1/" not in k}
    prefix = write_checkpoint(str(tmp_path / "partial.ckpt"), partial)
    with pytest.raises(UserError) as err:
        restored(small_model(1000), prefix)
    message = str(err.value)
    assert prefix in message and "variables missing" in message and "blocks_1/" in message

    with pytest.raises(UserError) as err:
        restored(small_model(1000, name="efficientnet-b3"), prefix)
    assert "efficientnet-b0/" in str(err.value) and "model=" in str(err.value)


def test_fine_tune_from_pretrained_starts_at_step_zero(tmp_path, cache_dir):
    raw = model_arrays(ModelConfig(name="efficientnet-b0", num_classes=1000))
    arrays = dict(raw)
    arrays["global_step"] = np.array(5000, np.int64)
    prefix = write_checkpoint(str(tmp_path / "b0" / "model.ckpt"), arrays)
    run_dir = tmp_path / "run"
    args = TINY + ["mode=train", "model=efficientnet_b0", "model.pretrained=" + prefix,
                   "hydra.run.dir=" + str(run_dir)]
    proc = run_py(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = open(str(run_dir / "run.log")).read()
    assert "initialised from pretrained weights" in log_text and "freshly initialised" in log_text
    steps = [json.loads(line)["step"] for line in open(str(run_dir / "metrics.jsonl"))]
    assert steps == [2, 4]
    reader = tf.compat.v1.train.NewCheckpointReader(str(run_dir / "checkpoints" / "model.ckpt-4"))
    assert reader.get_tensor("global_step") == 4
    # Its own checkpoint wins over model.pretrained when the run folder is reused.
    proc = run_py(args + ["train.steps=6"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = open(str(run_dir / "run.log")).read()
    assert "resumed from" in log_text and log_text.count("initialised from pretrained weights") == 1


def test_missing_pretrained_path_is_one_line_before_any_work(tmp_path, cache_dir):
    missing = str(tmp_path / "nope" / "model.ckpt")
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["model.pretrained=" + missing, "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode != 0 and missing in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("freeze_backbone", [True, False])
def test_freeze_backbone_and_batch_norm(tmp_path, cache_dir, freeze_backbone):
    pretrained = tf.compat.v1.train.NewCheckpointReader(ensure_imported("efficientnet_lite0", cache_dir))
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["mode=train", "train.steps=2", "train.freeze_bn=true",
                          "train.freeze_backbone=%s" % str(freeze_backbone).lower(),
                          "optimizer=momentum", "optimizer.lr=0.1", "hydra.run.dir=" + str(run_dir)],
                  tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = tf.compat.v1.train.NewCheckpointReader(str(run_dir / "checkpoints" / "model.ckpt-2"))

    def same(name):
        return np.array_equal(tuned.get_tensor(name), pretrained.get_tensor(name))

    scope = "efficientnet-lite0/"
    # Frozen batch norm: the moving statistics are used, never updated.
    assert same(scope + "blocks_3/tpu_batch_normalization_1/moving_mean")
    assert same(scope + "head/tpu_batch_normalization/moving_variance")
    assert same(scope + "stem/conv2d/kernel") == freeze_backbone
    assert same(scope + "blocks_5/depthwise_conv2d/depthwise_kernel") == freeze_backbone
    assert tuned.get_tensor(scope + "head/dense/kernel").shape == (1280, 10)
    assert not tuned.has_tensor(scope + "stem/conv2d/kernel/Momentum") or not freeze_backbone
