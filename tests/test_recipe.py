"""The training recipe (schedules, label smoothing, weight decay, clipping, weight EMA, eval.use_ema) and the GPU's
mixed-precision wiring, on small real graphs, plus one tiny real run with the whole recipe switched on."""
import copy
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from hydra.errors import ConfigCompositionException

from conftest import TINY, run_py
from effnet_exp.devices.base import Purpose
from effnet_exp.devices.config import CpuDeviceConfig, GpuDeviceConfig, LossScaleConfig, check_loss_scale
from effnet_exp.devices.factory import make_device
from effnet_exp.errors import UserError
from effnet_exp.model.restore import EMA_SUFFIX
from effnet_exp.training.config import OptimizerConfig, ScheduleConfig, TrainConfig, check_train
from effnet_exp.training.schedules import Schedule
from factory import run_config


def graph_values(tensor_fn, feeds):
    """Evaluates tensor_fn(placeholder) for each value in feeds."""
    with tf.Graph().as_default():
        step = tf.compat.v1.placeholder(tf.int64, [])
        tensor = tensor_fn(step)
        with tf.compat.v1.Session() as sess:
            return [float(sess.run(tensor, {step: s})) for s in feeds]


def test_reference_schedule_warmup_then_exponential_decay():
    # The reference: 0.016 per 256 images at a global batch of 2048, 5 warmup epochs, x0.97 every 2.4 epochs.
    opt = OptimizerConfig(lr=0.016, schedule=ScheduleConfig(name="exponential", warmup_epochs=5, decay_epochs=2.4,
                                                            decay_rate=0.97, scale_batch=256))
    steps_per_epoch = 1281167 / 2048.0
    schedule = Schedule(opt, 2048, steps_per_epoch, 350 * steps_per_epoch)
    assert schedule.base_lr == pytest.approx(0.128)
    warmup = round(5 * steps_per_epoch)
    decay_steps = 2.4 * steps_per_epoch
    steps = [0, 1, warmup // 2, warmup - 1, warmup, 10000, 218000]
    expected = [0.0, 0.128 / warmup, 0.128 * (warmup // 2) / warmup, 0.128 * (warmup - 1) / warmup,
                0.128 * 0.97 ** math.floor(warmup / decay_steps), 0.128 * 0.97 ** math.floor(10000 / decay_steps),
                0.128 * 0.97 ** math.floor(218000 / decay_steps)]
    assert [schedule.at(s) for s in steps] == pytest.approx(expected, rel=1e-9)
    # The graph form is a function of the global step alone: a resumed run continues at the same rate.
    graph = graph_values(lambda step: Schedule(opt, 2048, steps_per_epoch, 350 * steps_per_epoch).tensor(step),
                         steps)
    assert graph == pytest.approx(expected, rel=1e-6)


def test_cosine_and_constant_schedules():
    opt = OptimizerConfig(lr=0.1, schedule=ScheduleConfig(name="cosine", warmup_epochs=1))
    schedule = Schedule(opt, 32, 10, 110)  # 10 warmup steps, then 100 cosine steps
    steps = [0, 5, 10, 60, 110, 200]
    expected = [0.0, 0.05, 0.1, 0.05, 0.0, 0.0]
    assert [schedule.at(s) for s in steps] == pytest.approx(expected, abs=1e-12)
    assert graph_values(lambda s: Schedule(opt, 32, 10, 110).tensor(s), steps) == pytest.approx(expected, abs=1e-7)
    constant = OptimizerConfig(lr=0.3)
    assert graph_values(lambda s: Schedule(constant, 32, 10, 110).tensor(s), [0, 999]) == pytest.approx([0.3, 0.3])
    with pytest.raises(ConfigCompositionException) as err:
        run_config("optimizer.schedule.name=linear")
    assert "'linear'" in str(err.value.__cause__) and "constant, exponential, cosine" in str(err.value.__cause__)


def test_label_smoothing_and_weight_decay_skip_batch_norm():
    from effnet_exp.model.config import ModelConfig
    from effnet_exp.model.efficientnet import build_efficientnet
    from effnet_exp.training.regularization import decayed_variables, weight_decay_loss
    from effnet_exp.training.metrics import cross_entropy

    with tf.Graph().as_default():
        logits = tf.constant([[2.0, 0.0, -1.0]])
        smoothed = cross_entropy(logits, tf.constant([0]), 3, label_smoothing=0.3)
        log_p = logits - tf.reduce_logsumexp(logits, axis=1, keepdims=True)
        target = tf.constant([[0.8, 0.1, 0.1]])  # 1 - 0.3 + 0.3/3, 0.3/3, 0.3/3
        manual = -tf.reduce_sum(target * log_p)
        # The real model's variable names: batch-norm gamma/beta are excluded, every kernel and bias is in.
        build_efficientnet(tf.zeros([1, 32, 32, 3]), ModelConfig(num_classes=3), is_training=True)
        trainables = tf.compat.v1.trainable_variables()
        decayed = decayed_variables(trainables)
        names = {v.op.name for v in decayed}
        bn = [v for v in trainables if v.op.name.rsplit("/", 1)[1] in ("gamma", "beta")]
        assert bn and all("/tpu_batch_normalization" in v.op.name and v.op.name not in names for v in bn)
        assert len(decayed) == len(trainables) - len(bn)
        assert {n.rsplit("/", 1)[1] for n in names} == {"kernel", "bias", "depthwise_kernel"}
        assert "efficientnet-b0/head/dense/bias" in names
        decay = weight_decay_loss(trainables, 1e-5)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            got_smoothed, want_smoothed, got_decay, values = sess.run([smoothed, manual, decay, decayed])
    assert got_smoothed == pytest.approx(want_smoothed, rel=1e-6)
    assert got_decay == pytest.approx(1e-5 * sum(float(np.sum(v.astype(np.float64) ** 2)) / 2 for v in values),
                                      rel=1e-4)


def test_gradient_clipping_by_global_norm():
    from effnet_exp.training.regularization import clip_gradients

    with tf.Graph().as_default():
        a, b = tf.Variable([3.0]), tf.Variable([4.0])
        pairs = [(tf.constant([3.0]), a), (None, tf.Variable(0.0)), (tf.constant([4.0]), b)]
        assert clip_gradients(pairs, None) is pairs
        clipped = clip_gradients(pairs, 1.0)
        assert [v for _, v in clipped] == [a, b]
        with tf.compat.v1.Session() as sess:
            values = sess.run([g for g, _ in clipped])
    assert np.concatenate(values) == pytest.approx([0.6, 0.8])


def test_weights_average_names_updates_and_reset():
    from effnet_exp.training.regularization import WeightsAverage

    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("m/head/dense/kernel", initializer=0.0)
        mean = tf.compat.v1.get_variable("m/head/tpu_batch_normalization/moving_mean", initializer=0.0,
                                         trainable=False)
        step = tf.compat.v1.train.get_or_create_global_step()
        train = tf.group(tf.compat.v1.assign_add(w, 1.0), tf.compat.v1.assign_add(mean, 2.0),
                         tf.compat.v1.assign_add(step, 1))
        average = WeightsAverage(0.9999, step, [w, mean])
        op = average.after(train)
        assert [s.op.name for s in average.shadows] == ["m/head/dense/kernel" + EMA_SUFFIX,
                                                        "m/head/tpu_batch_normalization/moving_mean" + EMA_SUFFIX]
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(tf.compat.v1.assign(w, 5.0))  # "restored" weights
            sess.run(average.reset_op)
            assert sess.run(average.shadows[0]) == 5.0
            shadow, expected = 5.0, None
            for _ in range(3):
                n = sess.run(step)
                sess.run(op)
                decay = min(0.9999, (1.0 + n + 1) / (10.0 + n + 1))  # num_updates = the step after the update
                decay_low = min(0.9999, (1.0 + n) / (10.0 + n))
                value = sess.run(w)
                expected = [decay * shadow + (1 - decay) * value, decay_low * shadow + (1 - decay_low) * value]
                shadow = sess.run(average.shadows[0])
                assert any(shadow == pytest.approx(e, rel=1e-6) for e in expected)
            assert shadow < sess.run(w)  # it trails the weights


def test_gpu_mixed_precision_wiring_and_dynamic_loss_scale():
    """No GPU here: the float16 rewrite itself cannot run (Grappler skips auto_mixed_precision without a GPU), so
    this checks the session config switch and the loss-scale optimizer, which does run and is exercised for real:
    the scale grows after incr_every_n_steps finite steps, an overflow step is skipped, counted and halves it."""
    device = make_device(GpuDeviceConfig(mixed_precision=True,
                                         loss_scale=LossScaleConfig(init_scale=128.0, incr_every_n_steps=2)))
    config = device.session_config(Purpose.TRAIN)
    assert config.graph_options.rewrite_options.auto_mixed_precision == RewriterConfig.ON
    off = make_device(GpuDeviceConfig()).session_config(Purpose.TRAIN)
    assert off.graph_options.rewrite_options.auto_mixed_precision != RewriterConfig.ON
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("toy/kernel", initializer=1.0)
        scale = tf.compat.v1.placeholder_with_default(1.0, [])
        loss = tf.square(w - 3.0) * scale
        step = tf.compat.v1.train.get_or_create_global_step()
        opt, scaling = device.wrap_optimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1))
        assert type(opt).__name__ == "MixedPrecisionLossScaleOptimizer"
        assert make_device(CpuDeviceConfig()).wrap_optimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1))[1] \
            is None
        train = scaling.apply_gradients(opt.compute_gradients(loss, [w]), step)
        monitors = scaling.monitors(train)
        cpu = tf.compat.v1.ConfigProto()
        cpu.CopyFrom(config)
        cpu.gpu_options.allow_growth = False
        with tf.compat.v1.Session(config=cpu) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            scales = [sess.run(monitors)["loss_scale"] for _ in range(2)]  # 2 finite steps
            assert sess.run(w) == pytest.approx(1.0 + 0.4 + 0.32)  # plain gradient descent, unscaled gradients
            assert scales[-1] == 256.0
            before = sess.run(w)
            extra = sess.run(monitors, {scale: np.inf})
            assert sess.run(w) == before and extra["overflow_steps"] == 1 and sess.run(step) == 3
            assert sess.run(monitors)["loss_scale"] == 128.0


def test_recipe_config_errors_name_the_key():
    for train, key in ((TrainConfig(label_smoothing=1.0), "train.label_smoothing=1.0"),
                       (TrainConfig(weight_decay=-1.0), "train.weight_decay=-1.0"),
                       (TrainConfig(ema_decay=1.5), "train.ema_decay=1.5"),
                       (TrainConfig(clip_grad_norm=0.0), "train.clip_grad_norm=0.0")):
        with pytest.raises(UserError, match=key):
            check_train(train)
    check_train(TrainConfig())
    with pytest.raises(UserError, match=r"device.loss_scale.scale='huge'"):
        check_loss_scale(LossScaleConfig(scale="huge"))
    check_loss_scale(LossScaleConfig(scale="1024"))


def test_recipe_run_saves_ema_and_evaluates_it(tmp_path, cache_dir):
    """A tiny real run with the whole recipe on: the EMA shadows are in the checkpoint under the official names,
    the logged lr follows the schedule, eval uses the EMA weights, and eval.use_ema=false the raw ones; the config
    object is the same after the run as before it (what the run derives lives in the run spec)."""
    from omegaconf import OmegaConf

    from effnet_exp.modes import Mode
    from effnet_exp.experiment import prepare, run
    from effnet_exp.resume import typed_config
    from effnet_exp.run_folder import SAVED_CONFIG

    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["train.ema_decay=0.9999", "train.weight_decay=1e-5", "train.label_smoothing=0.1",
                          "train.clip_grad_norm=5", "optimizer.schedule.name=exponential",
                          "optimizer.schedule.warmup_epochs=0.02", "optimizer.schedule.scale_batch=16",
                          "hydra.run.dir={}".format(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = tf.compat.v1.train.NewCheckpointReader(str(run_dir / "checkpoints" / "model.ckpt-4")) \
        .get_variable_to_shape_map()
    model = [k for k in keys if k.startswith("efficientnet-lite0/") and not k.endswith(("/Adam", "/Adam_1"))
             and not k.endswith(EMA_SUFFIX)]
    assert any(k.endswith("/moving_variance") for k in model) and any(k.endswith("/gamma") for k in model)
    assert all(k + EMA_SUFFIX in keys for k in model)
    # lr = 1e-3 * 8/16, warmup over round(0.02 * 1438/8) = 4 steps; a record at step s used global step s-1.
    metrics = [json.loads(line) for line in open(str(run_dir / "metrics.jsonl")) if '"loss"' in line]
    assert [(m["step"], m["lr"]) for m in metrics] == [(2, pytest.approx(5e-4 / 4)), (4, pytest.approx(5e-4 * 3 / 4))]
    ema = json.load(open(str(run_dir / "eval.json")))
    assert ema["weights"] == "ema"

    saved = os.path.join(str(run_dir), SAVED_CONFIG)
    cfg = OmegaConf.to_object(typed_config(OmegaConf.load(saved), saved))
    cfg.mode, cfg.eval.checkpoint, cfg.eval.use_ema = Mode.eval, str(run_dir), False
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    before = copy.deepcopy(cfg)
    spec = prepare(cfg, str(eval_dir))
    assert spec.cfg is cfg and spec.class_names == [str(d) for d in range(10)]
    run(spec)
    assert cfg == before
    raw = json.load(open(str(eval_dir / "eval.json")))
    assert raw["weights"] == "raw" and raw["checkpoint"] == ema["checkpoint"]
    assert raw["loss"] != ema["loss"]
