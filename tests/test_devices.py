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
