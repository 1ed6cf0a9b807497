"""Progressive learning (train.progressive): the stage plan against hand-worked numbers and NumPy's linspace, the
config checks, the EfficientNetV2-S preset, and real runs of run.py with two stages (32 -> 48 px): the graph of each
stage read back from its checkpoint's .meta, the learning rate over the whole run, the optimizer state carried over
the boundary, a SIGTERM inside stage 2 resumed to the uninterrupted run's weights, and a two-replica mirrored run."""
import dataclasses
import math
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, metrics, read_json, run_py
from effnet_exp.data.config import Normalization
from effnet_exp.errors import UserError
from effnet_exp.config import requested_image_size
from effnet_exp.training.progressive import Plan, eval_image_size, eval_spec, plan, stage_at, stage_spec, stages
from effnet_exp.spec import RunSpec
from effnet_exp.validate import validate
from factory import run_config
from test_interrupts import assert_stopped, run_at


def test_four_stages_of_the_paper_for_s():
    """V2-S (Table 6): 128 -> 300 px, magnitude 5 -> 15, dropout 0.1 -> 0.3 over 4 equal shares of the steps."""
    got = stages(Plan(count=4, total_steps=1000, steps_per_run=1, image_size=(128, 300), magnitude=(5.0, 15.0),
                      mixup_alpha=(0.0, 0.0), dropout=(0.1, 0.3)))
    assert [(s.first_step, s.last_step) for s in got] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    # np.linspace(128, 300, 4) = 128, 185.33, 242.67, 300: the two between to the nearest multiple of 8.
    assert [s.image_size for s in got] == [128, 184, 240, 300]
    assert [s.magnitude for s in got] == pytest.approx(np.linspace(5, 15, 4))
    assert [s.dropout for s in got] == pytest.approx(np.linspace(0.1, 0.3, 4))
    assert [s.mixup_alpha for s in got] == [0.0] * 4
    assert [s.index for s in got] == [1, 2, 3, 4] and {s.count for s in got} == {4}


def test_stage_boundaries_are_whole_device_loops_and_the_last_stage_takes_the_rest():
    got = stages(Plan(count=3, total_steps=100, steps_per_run=10, image_size=(32, 64), magnitude=None,
                      mixup_alpha=(0.0, 0.3), dropout=(0.0, 0.0)))
    # 10 device loops into 3 stages: 3, 3, 4 loops.
    assert [(s.first_step, s.last_step) for s in got] == [(0, 30), (30, 60), (60, 100)]
    assert [s.image_size for s in got] == [32, 48, 64]
    assert [s.magnitude for s in got] == [None] * 3
    assert [s.mixup_alpha for s in got] == pytest.approx([0.0, 0.15, 0.3])
    # Which stage trains the step after a checkpoint's: a boundary belongs to the next stage.
    assert [stage_at(got, step).index for step in (0, 29, 30, 59, 60, 99, 100)] == [1, 1, 2, 2, 3, 3, 3]


def test_one_stage_trains_at_the_max_and_too_few_steps_is_an_error():
    (only,) = stages(Plan(count=1, total_steps=5, steps_per_run=1, image_size=(32, 96), magnitude=(5.0, 9.0),
                          mixup_alpha=(0.0, 0.2), dropout=(0.1, 0.2)))
    assert (only.first_step, only.last_step, only.image_size, only.magnitude, only.mixup_alpha, only.dropout) == \
        (0, 5, 96, 9.0, 0.2, 0.2)
    with pytest.raises(UserError, match=r"train.progressive.stages=4 needs at least one step per stage \(one device "
                                        r"loop of 2 steps\); the run has 6 steps"):
        stages(Plan(count=4, total_steps=6, steps_per_run=2, image_size=(32, 64), magnitude=None,
                    mixup_alpha=(0.0, 0.0), dropout=(0.0, 0.0)))


def test_the_plan_takes_its_max_values_from_the_run():
    cfg = run_config("dataset.augment=randaugment", "dataset.randaugment.magnitude=12", "train.mixup_alpha=0.4",
                     "model.dropout_rate=0.25", "train.progressive.stages=3", "train.progressive.min_image_size=64",
                     "train.progressive.min_mixup_alpha=0.1")
    assert plan(cfg, 96, 30, 1) == Plan(count=3, total_steps=30, steps_per_run=1, image_size=(64, 96),
                                        magnitude=(5.0, 12.0), mixup_alpha=(0.1, 0.4), dropout=(0.0, 0.25))
    # Without RandAugment there is no magnitude to grow; without a min size, the first stage is at half the size
    # (to a multiple of 8, at least 32); stages=0 (the default) is no plan at all.
    default = plan(run_config("train.progressive.stages=2"), 96, 30, 1)
    assert default.magnitude is None and default.image_size == (48, 96)
    assert plan(run_config("train.progressive.stages=2"), 100, 30, 1).image_size == (48, 100)
    assert plan(run_config("train.progressive.stages=2"), 40, 30, 1).image_size == (32, 40)
    assert plan(run_config(), 96, 30, 1) is None


def test_stage_spec_changes_only_the_stage_settings():
    cfg = run_config("dataset.augment=randaugment", "train.mixup_alpha=0.4", "model.image_size=64",
                     "train.progressive.stages=2", "train.progressive.min_image_size=32",
                     "train.progressive.eval_image_size=96")
    spec = RunSpec(cfg=cfg, device=None, run_dir="run", own_dir="run", model=cfg.model, image_size=64,
                   normalization=Normalization.lite, class_names=None, use_ema=True, total_steps=10)
    first, second = stages(plan(cfg, 64, 10, 1))
    got = stage_spec(spec, first, None, 0)
    assert (got.image_size, got.model.dropout_rate, got.cfg.model.dropout_rate, got.cfg.train.mixup_alpha,
            got.cfg.dataset.randaugment.magnitude, got.total_steps) == (32, 0.0, 0.0, 0.0, 5.0, 10)
    got = stage_spec(spec, second, "run/checkpoints/model.ckpt-5", 5)
    assert (got.image_size, got.model.dropout_rate, got.cfg.train.mixup_alpha, got.cfg.dataset.randaugment.magnitude,
            got.resume_checkpoint, got.resume_step) == (64, 0.2, 0.4, 10.0, "run/checkpoints/model.ckpt-5", 5)
    # The run's own spec is untouched, and its evaluation is at train.progressive.eval_image_size.
    assert (spec.image_size, spec.cfg.train.mixup_alpha, spec.model.dropout_rate) == (64, 0.4, 0.2)
    assert eval_spec(spec).image_size == 96
    assert eval_spec(dataclasses.replace(spec, cfg=run_config("model.image_size=64"))).image_size == 64


@pytest.mark.parametrize("overrides, message", [
    (["train.progressive.stages=-1"], "train.progressive.stages=-1 must be >= 0"),
    (["train.progressive.stages=2", "train.progressive.min_image_size=16"],
     "train.progressive.min_image_size=16 is too small"),
    (["train.progressive.stages=2", "train.progressive.eval_image_size=8"],
     "train.progressive.eval_image_size=8 is too small"),
    (["train.progressive.stages=5", "train.steps=4"],
     "train.progressive.stages=5 needs at least one step per stage; train.steps=4"),
    (["train.progressive.stages=2", "train.progressive.min_dropout=-0.1"],
     "train.progressive.min_dropout=-0.1 must be a finite number >= 0"),
    (["train.progressive.stages=2", "model.image_size=64", "train.progressive.min_image_size=128"],
     "train.progressive.min_image_size=128 is larger than the run's last train size 64"),
    (["train.progressive.stages=2", "dataset.augment=randaugment", "dataset.randaugment.magnitude=3"],
     "train.progressive.min_randaugment_magnitude=5.0 is above dataset.randaugment.magnitude=3.0"),
    (["train.progressive.stages=2", "train.progressive.min_mixup_alpha=0.5", "train.mixup_alpha=0.2"],
     "train.progressive.min_mixup_alpha=0.5 is above train.mixup_alpha=0.2"),
    (["train.progressive.stages=2", "train.progressive.min_dropout=0.3", "model.dropout_rate=0.2"],
     "train.progressive.min_dropout=0.3 is above model.dropout_rate=0.2"),
])
def test_bad_progressive_settings_name_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        validate(run_config(*overrides))
    assert message in str(err.value)


def test_settings_that_only_matter_with_stages_pass_without_them():
    validate(run_config("model.image_size=64", "train.progressive.min_image_size=128", "train.mixup_alpha=0"))
    validate(run_config("train.progressive.stages=2", "dataset.randaugment.magnitude=3"))  # no RandAugment: no rule
    validate(run_config("mode=eval", "eval.checkpoint=x", "train.progressive.stages=2", "model.image_size=64",
                        "train.progressive.min_image_size=128"))  # not a training mode


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "conf", "model", "efficientnetv2_s.yaml")),
                    reason="conf/model/efficientnetv2_s.yaml (the EfficientNetV2 models, issue 21) is not in this tree")
def test_the_efficientnetv2_s_preset_has_the_papers_stages():
    cfg = run_config("experiment=efficientnetv2_progressive", "dataset.data_dir=/data/imagenet")
    progressive = cfg.train.progressive
    # The paper's Table 6 for V2-S, and the authors' effnetv2_configs.py / hparams.py (sizes, 4 stages, base 128).
    assert (progressive.stages, progressive.min_image_size, progressive.eval_image_size) == (4, 128, 384)
    assert (progressive.min_randaugment_magnitude, cfg.dataset.randaugment.magnitude) == (5, 15)
    assert (progressive.min_mixup_alpha, cfg.train.mixup_alpha) == (0, 0)
    assert (progressive.min_dropout, cfg.model.dropout_rate) == (0.1, 0.3)
    assert cfg.dataset.augment.value == "randaugment" and cfg.model.image_size == 300
    validate(cfg)
    got = stages(plan(cfg, 300, 1000, 1))
    assert [s.image_size for s in got] == [128, 184, 240, 300]
    assert [s.magnitude for s in got] == pytest.approx([5, 25 / 3.0, 35 / 3.0, 15])


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO, "conf", "model", "efficientnetv2_s.yaml")),
                    reason="conf/model/efficientnetv2_s.yaml (the EfficientNetV2 models, issue 21) is not in this tree")
def test_a_v2_variant_grows_to_its_train_size_and_evaluates_at_its_eval_size():
    """Without a size asked for, V2-S trains up to the authors' 300 and evaluates at their 384; a size asked for
    (model.image_size) is the last stage's size, as for V1."""
    imagenet = ("dataset=imagenet", "dataset.data_dir=/data/imagenet")  # no size of its own, unlike the digits
    cfg = run_config("model=efficientnetv2_s", "train.progressive.stages=4", "train.progressive.min_image_size=128",
                     *imagenet)
    validate(cfg)
    image_size = requested_image_size(cfg)
    assert [s.image_size for s in stages(plan(cfg, image_size, 1000, 1))] == [128, 184, 240, 300]
    assert eval_image_size(cfg, image_size) == 384
    asked = run_config("model=efficientnetv2_s", "model.image_size=256", "train.progressive.stages=2", *imagenet)
    assert [s.image_size for s in stages(plan(asked, requested_image_size(asked), 1000, 1))] == [128, 256]
    assert eval_image_size(asked, requested_image_size(asked)) == 256
    with pytest.raises(UserError, match=r"min_image_size=320 is larger than the run's last train size 300"):
        validate(run_config("model=efficientnetv2_s", "train.progressive.stages=2",
                            "train.progressive.min_image_size=320", *imagenet))


# Lite0 cut to its first two blocks, from scratch, at 32 then 48 px over 8 steps; no dropout or drop-connect (their
# masks are fresh draws after a resume), RandAugment 2 -> 10 and MixUp 0 -> 0.4 growing (both drawn per image / step
# from the seed, so a resumed stage draws them again alike), Adam, EMA, a cosine schedule over the 8 steps.
STAGED = ["model.image_size=48", "model.blocks=[r1_k3_s11_e1_i32_o16,r2_k3_s22_e6_i16_o24]", "model.pretrained=null",
          "model.dropout_rate=0", "model.survival_prob=1.0", "train.batch_size=8", "train.steps=8",
          "train.log_every=2", "train.checkpoint_every=2", "eval.batch_size=128", "train.ema_decay=0.9",
          "optimizer.schedule.name=cosine", "dataset.augment=randaugment", "dataset.randaugment.magnitude=10",
          "train.mixup_alpha=0.4", "seed=3", "train.progressive.stages=2", "train.progressive.min_image_size=32",
          "train.progressive.min_randaugment_magnitude=2", "train.progressive.eval_image_size=64"]


def stage_records(run_dir):
    return [r for r in metrics(str(run_dir)) if "stage" in r]


def meta_graph(prefix):
    """The training graph a checkpoint was saved from (its .meta), as a tf.Graph."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.train.import_meta_graph(prefix + ".meta")
    return graph


def stem_input_side(graph):
    """The side of the images the model's first convolution reads (its input's static shape [B, S, S, 3]), the same
    in every replica."""
    (side,) = {int(op.inputs[0].shape[1]) for op in graph.get_operations()
               if op.type == "Conv2D" and "/stem/" in op.name and "gradients" not in op.name}
    return side


def dropout_rates(graph):
    """The rates of the tf.nn.dropout ops in a graph: the constant each keeps its uniform draws above."""
    return [float(tf.make_ndarray(op.inputs[1].op.get_attr("value"))) for op in graph.get_operations()
            if op.type == "GreaterEqual" and "/dropout/" in op.name and op.inputs[1].op.type == "Const"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cache_dir):
    """The uninterrupted two-stage run."""
    folder = tmp_path_factory.mktemp("whole")
    proc = run_py(STAGED + ["hydra.run.dir=" + str(folder / "run")], folder, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "run"


def test_two_stages_change_the_image_size_at_the_boundary(whole):
    checkpoints = whole / "checkpoints"
    log_text = (whole / "run.log").read_text()
    assert "progressive learning, stage 1/2: steps 1-4 at 32x32, RandAugment magnitude 2, MixUp alpha 0, " \
           "dropout 0" in log_text
    assert "progressive learning, stage 2/2: steps 5-8 at 48x48, RandAugment magnitude 10, MixUp alpha 0.4, " \
           "dropout 0" in log_text
    assert stage_records(whole) == [
        {"step": 0, "stage": 1, "stages": 2, "last_step": 4, "image_size": 32, "randaugment_magnitude": 2.0,
         "mixup_alpha": 0.0, "dropout": 0.0},
        {"step": 4, "stage": 2, "stages": 2, "last_step": 8, "image_size": 48, "randaugment_magnitude": 10.0,
         "mixup_alpha": 0.4, "dropout": 0.0}]
    # The graphs themselves: the pipeline's RandAugment scaled to each size, and the model's input in each stage's
    # saved graph.
    assert "pixel constants x 32/224" in log_text and "pixel constants x 48/224" in log_text
    assert [stem_input_side(meta_graph(str(checkpoints / ("model.ckpt-%d" % n)))) for n in (2, 4, 6, 8)] == \
        [32, 32, 48, 48]
    # Stage 2 started from stage 1's last checkpoint; the evaluation ran at train.progressive.eval_image_size.
    assert "resumed from " + str(checkpoints / "model.ckpt-4") in log_text
    assert read_json(str(whole / "eval.json"))["image_size"] == 64


def test_the_optimizer_state_and_the_schedule_span_both_stages(whole):
    reader = tf.compat.v1.train.NewCheckpointReader(str(whole / "checkpoints" / "model.ckpt-8"))
    # Adam's beta1_power starts at beta1 = 0.9 and is multiplied by it at every update: 8 updates, not 4.
    assert float(reader.get_tensor("beta1_power")) == pytest.approx(0.9 ** 9, rel=1e-6)
    assert int(reader.get_tensor("global_step")) == 8
    # Cosine from lr = 1e-3 (conf/optimizer/adam.yaml) to 0 at step 8 of the run, not of the stage.
    train = [r for r in metrics(str(whole)) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    # The lr a log record shows is its last step's, computed before that step's update (from step - 1).
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 8.0)) for s in (2, 4, 6, 8)]
    assert [r["lr"] for r in train] == pytest.approx(expected, rel=1e-5)


def test_killed_inside_stage_2_resumes_to_the_uninterrupted_weights(whole, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_at("training@6", STAGED + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "at step 6; checkpoint {} saved".format(
        run_dir / "checkpoints" / "model.ckpt-6"))
    proc = run_py(["resume=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (run_dir / "run.log").read_text()
    resumed = log_text[log_text.rindex("resuming from"):]
    assert "stage 1/2" not in resumed and "progressive learning, stage 2/2: steps 5-8 at 48x48" in resumed
    assert stage_records(run_dir) == stage_records(whole)  # one record per stage, not two
    assert [r["step"] for r in metrics(str(run_dir)) if "loss" in r] == [2, 4, 6, 8]
    want = [r for r in metrics(str(whole)) if "loss" in r][-1]
    got = [r for r in metrics(str(run_dir)) if "loss" in r][-1]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["top1"] == want["top1"]
    readers = [tf.compat.v1.train.NewCheckpointReader(str(d / "checkpoints" / "model.ckpt-8"))
               for d in (whole, run_dir)]
    names = readers[0].get_variable_to_shape_map()
    assert any(n.endswith("ExponentialMovingAverage") for n in names) and any("/Adam" in n for n in names)
    for name in names:
        np.testing.assert_allclose(readers[1].get_tensor(name), readers[0].get_tensor(name), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    final = {k: v for k, v in read_json(str(run_dir / "eval.json")).items() if k not in ("checkpoint", "images_per_sec")}
    assert final == {k: v for k, v in read_json(str(whole / "eval.json")).items()
                     if k not in ("checkpoint", "images_per_sec")}


def test_two_stages_under_a_mirrored_strategy_with_growing_dropout(tmp_path, cache_dir):
    """Two replicas on logical CPU devices; dropout 0 -> 0.3 (the rate constant in each stage's saved graph)."""
    run_dir = tmp_path / "run"
    args = [a for a in STAGED if not a.startswith(("model.dropout_rate", "train.steps", "train.progressive.eval"))]
    proc = run_py(args + ["train.steps=4", "mode=train", "model.dropout_rate=0.3", "device.strategy=mirrored",
                          "device.replicas=2", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["image_size"], r["dropout"]) for r in stage_records(run_dir)] == [(32, 0.0), (48, 0.3)]
    first, last = (meta_graph(str(run_dir / "checkpoints" / ("model.ckpt-%d" % n))) for n in (2, 4))
    rates = dropout_rates(last)
    assert dropout_rates(first) == [] and len(rates) == 2 and rates == pytest.approx([0.3, 0.3])  # one per replica
    assert (stem_input_side(first), stem_input_side(last)) == (32, 48)
    assert int(tf.compat.v1.train.NewCheckpointReader(
        str(run_dir / "checkpoints" / "model.ckpt-4")).get_tensor("global_step")) == 4
