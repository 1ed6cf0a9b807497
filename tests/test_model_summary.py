"""model_summary: stage rows, parameter counts and multiply-adds of V1, Lite and V2 against published figures and
Keras; the command line with --json and a bad override."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from effnet_exp import optional
from effnet_exp.errors import UserError
from effnet_exp.model.summary import summarize
from effnet_exp.tools.model_summary import model_config


def rows(summary):
    return [(s.name, s.kind, s.repeats, s.kernel, s.stride, s.expansion, s.se, s.channels, s.size)
            for s in summary.stages]


def between_rounded(value, published):
    """value rounds to the published figure, given to two significant digits: within half a unit of its last
    digit. The papers print FLOPs that way (0.39B, 0.72B, 1.2B)."""
    digits = 2 - int(np.floor(np.log10(published))) - 1
    half = 0.5 * 10.0 ** -digits
    return published - half <= value < published + half


def test_b0_stages_params_and_multiply_adds_are_the_published_ones():
    summary = summarize(model_config(["model=efficientnet_b0"]))
    # EfficientNet paper, Table 1 (stage 1 and 9: stem and head).
    assert rows(summary) == [
        ("stem", "Conv3x3", 1, 3, 2, None, None, 32, 112),
        ("1", "MBConv", 1, 3, 1, 1, 0.25, 16, 112),
        ("2", "MBConv", 2, 3, 2, 6, 0.25, 24, 56),
        ("3", "MBConv", 2, 5, 2, 6, 0.25, 40, 28),
        ("4", "MBConv", 3, 3, 2, 6, 0.25, 80, 14),
        ("5", "MBConv", 3, 5, 1, 6, 0.25, 112, 14),
        ("6", "MBConv", 4, 5, 2, 6, 0.25, 192, 7),
        ("7", "MBConv", 1, 3, 1, 6, 0.25, 320, 7),
        ("head", "Conv1x1+pool+dense", 1, 1, 1, None, None, 1280, 7)]
    # keras.applications.EfficientNetB0(weights=None): 5,330,571 params, 7 of them its Normalization layer's
    # (mean, variance: 3 each, count: 1), which has no counterpart here; 5,288,548 trainable.
    assert (summary.params, summary.trainable_params) == (5330564, 5288548)
    assert summary.image_size == 224
    assert sum(s.params for s in summary.stages) == summary.params
    assert between_rounded(summary.flops / 1e9, 0.39)  # the paper: 0.39B FLOPs


@pytest.mark.parametrize("variant,published", [("b0", 0.72), ("b1", 1.2), ("b2", 1.7), ("b3", 3.0)])
def test_v2_b_multiply_adds_are_the_papers(variant, published):
    # EfficientNetV2 paper / google/automl efficientnetv2 README: FLOPs at the eval size (224, 240, 260, 300).
    summary = summarize(model_config(["model=efficientnetv2_" + variant]))
    assert between_rounded(summary.flops / 1e9, published), summary.flops


def test_v2_s_stages_are_the_papers_table():
    summary = summarize(model_config(["model=efficientnetv2_s", "model.image_size=64"]))
    # EfficientNetV2 paper, Table 4 (EfficientNetV2-S), at a 64x64 input.
    assert rows(summary) == [
        ("stem", "Conv3x3", 1, 3, 2, None, None, 24, 32),
        ("1", "Fused-MBConv", 2, 3, 1, 1, None, 24, 32),
        ("2", "Fused-MBConv", 4, 3, 2, 4, None, 48, 16),
        ("3", "Fused-MBConv", 4, 3, 2, 4, None, 64, 8),
        ("4", "MBConv", 6, 3, 2, 4, 0.25, 128, 4),
        ("5", "MBConv", 9, 3, 1, 6, 0.25, 160, 4),
        ("6", "MBConv", 15, 3, 2, 6, 0.25, 256, 2),
        ("head", "Conv1x1+pool+dense", 1, 1, 1, None, None, 1280, 2)]
    assert summary.trainable_params == 21458488  # keras.applications.EfficientNetV2S


def test_lite_and_class_count():
    lite = summarize(model_config(["model=efficientnet_lite0", "model.image_size=64"]))
    assert lite.trainable_params == 4652008  # EfficientNet-Lite0 with 1000 classes (tests/test_model.py)
    assert all(s.se is None for s in lite.stages)
    digits = summarize(model_config(["model=efficientnet_lite0", "dataset=digits", "model.image_size=64"]))
    assert lite.trainable_params - digits.trainable_params == 990 * 1281  # the 1000- vs 10-class classifier


@pytest.mark.skipif(optional.keras() is None, reason="Keras 3 (TF 2.x stack) is the witness")
def test_v2_b0_totals_equal_keras():
    keras = optional.keras()
    model = keras.applications.EfficientNetV2B0(weights=None, include_preprocessing=False)
    summary = summarize(model_config(["model=efficientnetv2_b0", "model.image_size=64"]))
    assert summary.params == model.count_params()
    assert summary.trainable_params == sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def tool(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "effnet_exp.tools.model_summary"] + list(args), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_command_line_json_and_bad_overrides(tmp_path):
    out = tmp_path / "b0.json"
    proc = tool(["model=efficientnetv2_b0", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sorted(result) == ["flops", "image_size", "model", "params", "trainable_params"]
    assert (result["model"], result["image_size"], result["trainable_params"], result["params"]) == (
        "efficientnetv2-b0", 224, 7139704, 7200312)  # Keras: 7,200,312 params without its preprocessing layers
    assert between_rounded(result["flops"] / 1e9, 0.72)
    assert "| 1 | Fused-MBConv | 1 | 3 | 1 | 1 | - | 16 | 112x112 |" in proc.stdout
    assert "params 7,200,312 (trainable 7,139,704)" in proc.stdout

    for args, named in ((["model=efficientnetv2_x"], "efficientnetv2_x"),
                        (["model=efficientnetv2_b0", "model.dropout_rate=1.5"], "model.dropout_rate=1.5")):
        bad_json = tmp_path / "bad.json"
        bad = tool(args + ["--json", str(bad_json)], tmp_path)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in errors[0], bad.stderr
        assert not bad_json.exists() and bad.stdout == ""


@pytest.mark.parametrize("override,named", [("model.image_size=4", "model.image_size=4"),
                                            ("model.width_coefficient=wide", "model.width_coefficient=wide"),
                                            ("model.blocks=[r1_k3_s11_e1_i32_o16_c2]", "c2")])
def test_model_config_errors_in_process(override, named):
    with pytest.raises(UserError) as err:
        model_config(["model=efficientnetv2_b0", override])
    assert named in str(err.value)
