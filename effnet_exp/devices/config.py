"""Typed schemas of the `device` config group, one per device (no TensorFlow import here)."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class CpuDeviceConfig:
    name: str = "cpu"
    # 0 lets TensorFlow choose.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    xla: bool = False


@dataclass
class GpuDeviceConfig(CpuDeviceConfig):
    name: str = "gpu"
    allow_growth: bool = True
    visible_devices: Optional[str] = None


@dataclass
class AscendDeviceConfig(CpuDeviceConfig):
    name: str = "ascend"
    use_off_line: bool = True
    precision_mode: str = "allow_mix_precision"
    mix_compile_mode: bool = False
    iterations_per_loop: int = 1
    # JSON black/white/gray list for mixed precision; only with allow_mix_precision*.
    modify_mixlist: Optional[str] = None
    graph_memory_max_size: Optional[int] = None
    variable_memory_max_size: Optional[int] = None
    remapping: bool = False
    memory_optimization: bool = False
