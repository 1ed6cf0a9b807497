"""Session configs per device. The Ascend test FAKES the npu_bridge module (it cannot run off an Ascend
image): it checks only our wiring of the NpuOptimizer session config, not the adapter itself."""
import sys
import types

import pytest
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.devices.config import AscendDeviceConfig, CpuDeviceConfig, GpuDeviceConfig
from effnet_exp.devices.session import check_device_available, make_session_config
from effnet_exp.errors import UserError


@pytest.fixture
def fake_npu_bridge(monkeypatch):
    """A stand-in for Huawei's npu_bridge package: importable, and nothing more."""
    package = types.ModuleType("npu_bridge")
    npu_init = types.ModuleType("npu_bridge.npu_init")
    package.npu_init = npu_init
    monkeypatch.setitem(sys.modules, "npu_bridge", package)
    monkeypatch.setitem(sys.modules, "npu_bridge.npu_init", npu_init)


def test_ascend_session_config_wiring_with_fake_npu_bridge(fake_npu_bridge):
    cfg = AscendDeviceConfig(precision_mode="allow_fp32_to_fp16", iterations_per_loop=10,
                             modify_mixlist="/tmp/mix.json", graph_memory_max_size=123)
    config = make_session_config(cfg)
    rewrite = config.graph_options.rewrite_options
    (custom,) = [o for o in rewrite.custom_optimizers if o.name == "NpuOptimizer"]
    params = custom.parameter_map
    assert params["use_off_line"].b is True
    assert params["precision_mode"].s == b"allow_fp32_to_fp16"
    assert params["mix_compile_mode"].b is False
    assert params["iterations_per_loop"].i == 10
    assert params["modify_mixlist"].s == b"/tmp/mix.json"
    assert params["graph_memory_max_size"].s == b"123"
    assert "variable_memory_max_size" not in params
    assert rewrite.remapping == RewriterConfig.OFF
    assert rewrite.memory_optimization == RewriterConfig.OFF
    assert config.allow_soft_placement


def test_ascend_default_precision_mode_is_mixed(fake_npu_bridge):
    params = make_session_config(AscendDeviceConfig()).graph_options.rewrite_options.custom_optimizers[0]
    assert params.parameter_map["precision_mode"].s == b"allow_mix_precision"


def test_ascend_without_npu_bridge_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "npu_bridge", None)  # makes `import npu_bridge` fail, even on an NPU box
    with pytest.raises(UserError) as err:
        check_device_available(AscendDeviceConfig())
    assert "npu_bridge" in str(err.value) and "device=ascend" in str(err.value)


def test_cpu_and_gpu_configs():
    cpu = make_session_config(CpuDeviceConfig(intra_op_threads=2, inter_op_threads=1))
    assert (cpu.intra_op_parallelism_threads, cpu.inter_op_parallelism_threads) == (2, 1)
    assert not cpu.graph_options.rewrite_options.custom_optimizers
    gpu = make_session_config(GpuDeviceConfig(visible_devices="1", xla=True))
    assert gpu.gpu_options.allow_growth and gpu.gpu_options.visible_device_list == "1"
    assert gpu.graph_options.optimizer_options.global_jit_level > 0


def test_ascend_loop_and_precision_mode_checks_with_fake_npu_bridge(fake_npu_bridge, tmp_path, monkeypatch):
    """FAKE npu_bridge (importable, nothing more): checks our validation of the Ascend fields -- precision_mode
    among CANN's values, iterations_per_loop > 1 only without mix_compile_mode (and then the device-side input,
    enable_data_pre_proc), modify_mixlist only with allow_mix_precision* and an existing file."""
    for name in ("RANK_SIZE", "RANK_ID", "RANK_TABLE_FILE", "ASCEND_DEVICE_ID", "DEVICE_ID"):
        monkeypatch.delenv(name, raising=False)
    for mode in ("allow_mix_precision", "must_keep_origin_dtype", "force_fp32", "allow_mix_precision_bf16",
                 "allow_fp32_to_fp16", "force_fp16", "allow_mix_precision_fp16", "cube_fp16in_fp32out"):
        check_device_available(AscendDeviceConfig(precision_mode=mode))
    bad = [(AscendDeviceConfig(precision_mode="fp16"), "device.precision_mode='fp16' is not one of"),
           (AscendDeviceConfig(iterations_per_loop=0), "device.iterations_per_loop=0"),
           (AscendDeviceConfig(iterations_per_loop=5, mix_compile_mode=True), "needs device.mix_compile_mode=false"),
           (AscendDeviceConfig(precision_mode="force_fp16", modify_mixlist=str(tmp_path)),
            "only used with device.precision_mode=allow_mix_precision"),
           (AscendDeviceConfig(modify_mixlist=str(tmp_path / "missing.json")), "missing.json: no such file")]
    for cfg, message in bad:
        with pytest.raises(UserError) as err:
            check_device_available(cfg)
        assert message in str(err.value)
    monkeypatch.setenv("RANK_SIZE", "2")
    with pytest.raises(UserError, match="RANK_SIZE=2 needs RANK_ID"):
        check_device_available(AscendDeviceConfig())
    looped = make_session_config(AscendDeviceConfig(iterations_per_loop=5)).graph_options.rewrite_options
    assert looped.custom_optimizers[0].parameter_map["enable_data_pre_proc"].b is True
    single = make_session_config(AscendDeviceConfig()).graph_options.rewrite_options
    assert "enable_data_pre_proc" not in single.custom_optimizers[0].parameter_map


def test_iterations_per_loop_needs_whole_loops():
    from types import SimpleNamespace

    from effnet_exp.training.config import OptimizerConfig, TrainConfig
    from effnet_exp.training.optimizers import check_training_config

    cfg = SimpleNamespace(optimizer=OptimizerConfig(), device=AscendDeviceConfig(iterations_per_loop=10),
                          train=TrainConfig(log_every=20, checkpoint_every=100, steps=1000))
    check_training_config(cfg)
    cfg.train.log_every = 15
    with pytest.raises(UserError, match="train.log_every=15 must be a multiple of device.iterations_per_loop=10"):
        check_training_config(cfg)
    cfg.device = CpuDeviceConfig()  # no device loop: any value
    check_training_config(cfg)
