"""Session configs per device and the device checks. The Ascend tests FAKE the npu_bridge module (it cannot run
off an Ascend image): they check only our wiring of the NpuOptimizer session config, not the adapter itself."""
import os
import sys
import types

import pytest
import tensorflow as tf
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.devices.base import Purpose
from effnet_exp.devices.config import AscendDeviceConfig, CpuDeviceConfig, GpuDeviceConfig, PrecisionMode, \
    check_device
from effnet_exp.devices.factory import make_device
from effnet_exp.errors import UserError
from conftest import TINY, run_py
from factory import run_config

NO_RANKS = {}  # an environment without RANK_SIZE / RANK_ID / ...


@pytest.fixture
def fake_npu_bridge(monkeypatch):
    """A stand-in for Huawei's npu_bridge package: importable, and nothing more."""
    package = types.ModuleType("npu_bridge")
    npu_init = types.ModuleType("npu_bridge.npu_init")
    package.npu_init = npu_init
    monkeypatch.setitem(sys.modules, "npu_bridge", package)
    monkeypatch.setitem(sys.modules, "npu_bridge.npu_init", npu_init)


def npu_params(device, purpose=Purpose.TRAIN):
    rewrite = device.session_config(purpose).graph_options.rewrite_options
    (custom,) = [o for o in rewrite.custom_optimizers if o.name == "NpuOptimizer"]
    return custom.parameter_map


def test_ascend_session_config_wiring_with_fake_npu_bridge(fake_npu_bridge):
    cfg = AscendDeviceConfig(precision_mode=PrecisionMode.allow_fp32_to_fp16, iterations_per_loop=10,
                             modify_mixlist="/tmp/mix.json", graph_memory_max_size=123)
    device = make_device(cfg, NO_RANKS)
    config = device.session_config(Purpose.TRAIN)
    params = npu_params(device)
    assert params["use_off_line"].b is True
    assert params["precision_mode"].s == b"allow_fp32_to_fp16"
    assert params["mix_compile_mode"].b is False
    assert params["iterations_per_loop"].i == 10
    assert params["modify_mixlist"].s == b"/tmp/mix.json"
    assert params["graph_memory_max_size"].s == b"123"
    assert "variable_memory_max_size" not in params
    rewrite = config.graph_options.rewrite_options
    assert rewrite.remapping == RewriterConfig.OFF
    assert rewrite.memory_optimization == RewriterConfig.OFF
    assert config.allow_soft_placement


def test_ascend_inference_session_config_has_no_device_loop(fake_npu_bridge):
    """FAKE npu_bridge: evaluation, prediction and export graphs have no loop variables, so their session config
    carries neither iterations_per_loop nor the device-side input, but the same precision mode."""
    device = make_device(AscendDeviceConfig(iterations_per_loop=5), NO_RANKS)
    train, inference = npu_params(device, Purpose.TRAIN), npu_params(device, Purpose.INFERENCE)
    assert train["iterations_per_loop"].i == 5 and train["enable_data_pre_proc"].b is True
    assert "iterations_per_loop" not in inference and "enable_data_pre_proc" not in inference
    assert inference["precision_mode"].s == b"allow_mix_precision"
    assert device.steps_per_run == 5


def test_ascend_default_precision_mode_is_mixed(fake_npu_bridge):
    assert npu_params(make_device(AscendDeviceConfig(), NO_RANKS))["precision_mode"].s == b"allow_mix_precision"


def test_ascend_without_npu_bridge_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "npu_bridge", None)  # makes `import npu_bridge` fail, even on an NPU box
    with pytest.raises(UserError) as err:
        make_device(AscendDeviceConfig(), NO_RANKS)
    assert "npu_bridge" in str(err.value) and "device=ascend" in str(err.value)


def test_cpu_and_gpu_configs():
    cpu = make_device(CpuDeviceConfig(intra_op_threads=2, inter_op_threads=1)).session_config(Purpose.TRAIN)
    assert (cpu.intra_op_parallelism_threads, cpu.inter_op_parallelism_threads) == (2, 1)
    assert not cpu.graph_options.rewrite_options.custom_optimizers
    gpu = make_device(GpuDeviceConfig(visible_devices="1", xla=True)).session_config(Purpose.INFERENCE)
    assert gpu.gpu_options.allow_growth and gpu.gpu_options.visible_device_list == "1"
    assert gpu.graph_options.optimizer_options.global_jit_level > 0


def test_precision_mode_is_a_schema_choice():
    """Hydra rejects a precision mode CANN does not have, naming the key and the allowed values."""
    with pytest.raises(ConfigCompositionException) as err:
        run_config("device=ascend", "device.precision_mode=fp16")
    assert isinstance(err.value.__cause__, ValidationError)
    message = str(err.value.__cause__)
    assert "precision_mode" in message and "'fp16'" in message and "allow_mix_precision" in message
    assert run_config("device=ascend", "device.precision_mode=force_fp16").device.precision_mode == \
        PrecisionMode.force_fp16


def test_ascend_loop_and_mixlist_checks(tmp_path):
    """Our validation of the Ascend fields: iterations_per_loop >= 1, > 1 only without mix_compile_mode,
    modify_mixlist only with allow_mix_precision* and an existing file, no tf.distribute strategy."""
    for mode in PrecisionMode:
        check_device(AscendDeviceConfig(precision_mode=mode))
    bad = [(AscendDeviceConfig(iterations_per_loop=0), "device.iterations_per_loop=0"),
           (AscendDeviceConfig(iterations_per_loop=5, mix_compile_mode=True), "needs device.mix_compile_mode=false"),
           (AscendDeviceConfig(precision_mode=PrecisionMode.force_fp16, modify_mixlist=str(tmp_path)),
            "only used with device.precision_mode=allow_mix_precision"),
           (AscendDeviceConfig(modify_mixlist=str(tmp_path / "missing.json")), "missing.json: no such file")]
    for cfg, message in bad:
        with pytest.raises(UserError) as err:
            check_device(cfg)
        assert message in str(err.value)


def test_ascend_environment_is_read_when_the_device_is_made(fake_npu_bridge):
    with pytest.raises(UserError, match="RANK_SIZE=2 needs RANK_ID"):
        make_device(AscendDeviceConfig(), {"RANK_SIZE": "2"})


def test_iterations_per_loop_needs_whole_loops(fake_npu_bridge):
    """train.* step counts must be whole device loops; an epoch-derived step total is rounded up (spec.py)."""
    cfg = run_config("device=ascend", "device.iterations_per_loop=10", "train.log_every=20",
                     "train.checkpoint_every=100", "train.steps=1000")
    device = make_device(cfg.device, NO_RANKS)
    device.check(cfg)
    cfg.train.log_every = 15
    with pytest.raises(UserError, match="train.log_every=15 must be a multiple of device.iterations_per_loop=10"):
        device.check(cfg)
    make_device(CpuDeviceConfig()).check(cfg)  # no device loop: any value


def test_epoch_step_total_is_rounded_up_to_whole_loops():
    from effnet_exp.spec import _step_total

    train = run_config("train.epochs=1", "train.batch_size=10").train
    assert _step_total(train, 95, 1) == 10
    assert _step_total(train, 95, 4) == 12  # 10 steps -> 3 loops of 4
    assert _step_total(train, 80, 4) == 8


# --------------------------------------------------------------------------- the device asked for is the device used
needs_no_gpu = pytest.mark.skipif(bool(tf.config.experimental.list_physical_devices("GPU")),
                                  reason="this machine has a GPU: device=gpu uses it")


@needs_no_gpu
def test_gpu_asked_without_a_gpu_is_one_error_before_any_work(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(["device=gpu", "hydra.run.dir=" + str(run_dir)] + TINY, tmp_path, cache_dir)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: device=gpu, but TensorFlow {} ({}) sees no GPU; use device=cpu, or "
                                        "device.allow_cpu_fallback=true to run on the CPU anyway".format(
                                            tf.__version__, "a build with CUDA" if tf.test.is_built_with_cuda()
                                            else "a CPU-only build")]
    assert sorted(os.listdir(str(run_dir))) == [".hydra", "run.log"]


@needs_no_gpu
def test_gpu_with_cpu_fallback_warns_and_every_run_logs_its_device(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = TINY + ["train.steps=1", "train.log_every=1", "hydra.run.dir=" + str(run_dir)]
    proc = run_py(args + ["device=gpu", "device.allow_cpu_fallback=true", "mode=train"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = open(str(run_dir / "run.log")).read()
    assert "sees no GPU: running on the CPU (device.allow_cpu_fallback=true)" in log_text
    assert log_text.count("device=gpu: no GPU, the CPU") == 1
    proc = run_py(["mode=eval", "eval.checkpoint=" + str(run_dir), "hydra.run.dir=" + str(tmp_path / "eval")] + TINY,
                  tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = open(str(tmp_path / "eval" / "run.log")).read()
    assert log_text.count("device=cpu: the CPU (TensorFlow {})".format(tf.__version__)) == 1
