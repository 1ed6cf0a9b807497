"""Typed schemas of the `device` config group, one per device (no TensorFlow import here)."""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class CpuDeviceConfig:
    name: str = "cpu"
    # 0 lets TensorFlow choose.
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    xla: bool = False
    # Training on TF 2.x: swish's gradient compiled by XLA into one element-wise kernel instead of six passes (B0
    # trains 16% faster on 2 CPU cores). No effect on TF 1.15, whose XLA is slower there.
    xla_swish_grad: bool = True
    # Data parallelism with tf.distribute (effnet_exp/devices/strategy.py; cpu and gpu only): none | mirrored
    # (device.replicas devices of this host) | multi_worker (the workers TF_CONFIG lists, each started with the
    # same command). Under a strategy train.batch_size is the global batch, split evenly over the replicas.
    strategy: str = "none"
    # mirrored: how many devices; 0 = every visible GPU (device=gpu); device=cpu needs N >= 1 logical CPU devices.
    # multi_worker: 0 (each worker replicates over all its GPUs, or its CPU).
    replicas: int = 0


@dataclass
class LossScaleConfig:
    """device.loss_scale: loss scaling for float16 training (effnet_exp/devices/loss_scaling.py)."""
    # dynamic | a fixed scale such as 1024 | none.
    scale: str = "dynamic"
    # dynamic: start here, multiply by incr_ratio after incr_every_n_steps finite steps in a row.
    init_scale: float = 32768.0
    incr_every_n_steps: int = 1000
    incr_ratio: float = 2.0
    # Ascend only (the GPU's dynamic scale divides by incr_ratio at every overflow): multiply by decr_ratio
    # after decr_every_n_nan_or_inf overflow steps.
    decr_every_n_nan_or_inf: int = 2
    decr_ratio: float = 0.8


@dataclass
class GpuDeviceConfig(CpuDeviceConfig):
    name: str = "gpu"
    allow_growth: bool = True
    # Not measured on a GPU: off until it is.
    xla_swish_grad: bool = False
    visible_devices: Optional[str] = None
    # Automatic mixed precision: the float16 graph rewrite (variables stay float32) with loss scaling.
    mixed_precision: bool = False
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)


@dataclass
class AscendDeviceConfig(CpuDeviceConfig):
    name: str = "ascend"
    # The NPU compiles the graph itself (CANN): no XLA.
    xla_swish_grad: bool = False
    use_off_line: bool = True
    # One of effnet_exp.devices.session.PRECISION_MODES; the float16 ones get loss scaling (device.loss_scale).
    precision_mode: str = "allow_mix_precision"
    mix_compile_mode: bool = False
    # Training steps per sess.run, looped on the device (> 1 needs mix_compile_mode=false).
    iterations_per_loop: int = 1
    # JSON black/white/gray list for mixed precision; only with allow_mix_precision*.
    modify_mixlist: Optional[str] = None
    graph_memory_max_size: Optional[int] = None
    variable_memory_max_size: Optional[int] = None
    remapping: bool = False
    memory_optimization: bool = False
    # Through npu_bridge's NPULossScaleOptimizer whenever precision_mode computes in float16.
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
