"""Typed schemas of the `device` config group, one per device, and their checks (no TensorFlow import here)."""
import enum
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from effnet_exp.errors import UserError


class Strategy(str, enum.Enum):
    """device.strategy: tf.distribute data parallelism (effnet_exp/devices/distribute.py)."""
    none = "none"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


class PrecisionMode(str, enum.Enum):
    """CANN's precision_mode values (the TF adapter's npu_attrs.cc)."""
    allow_mix_precision = "allow_mix_precision"
    allow_mix_precision_fp16 = "allow_mix_precision_fp16"
    allow_mix_precision_bf16 = "allow_mix_precision_bf16"
    allow_fp32_to_fp16 = "allow_fp32_to_fp16"
    allow_fp32_to_bf16 = "allow_fp32_to_bf16"
    must_keep_origin_dtype = "must_keep_origin_dtype"
    force_fp32 = "force_fp32"
    cube_fp16in_fp32out = "cube_fp16in_fp32out"
    force_fp16 = "force_fp16"


# The modes that compute (some) ops in float16, so gradients can underflow/overflow: they get loss scaling.
# force_fp32 / cube_fp16in_fp32out feed matrix ops float16 inputs too; the bf16 modes and
# must_keep_origin_dtype (a float32 graph stays float32) do not need it.
FLOAT16_PRECISION_MODES = (PrecisionMode.allow_mix_precision, PrecisionMode.allow_mix_precision_fp16,
                           PrecisionMode.allow_fp32_to_fp16, PrecisionMode.force_fp32,
                           PrecisionMode.cube_fp16in_fp32out, PrecisionMode.force_fp16)


class DumpMode(str, enum.Enum):
    """device.dump.mode: which of CANN's dumps the training sessions write (docs/ascend.md)."""
    none = "none"
    overflow = "overflow"  # the adapter's enable_dump_debug: the operators whose results overflow float16
    data = "data"          # the adapter's enable_dump: operators' input / output tensors at dump.steps


class DumpData(str, enum.Enum):
    """device.dump.data: the adapter's dump_mode values (npu_attrs.cc checkDumpMode)."""
    input = "input"
    output = "output"
    all = "all"


class OverflowKind(str, enum.Enum):
    """device.dump.overflow: the adapter's dump_debug_mode values (npu_attrs.cc checkDumpDebugMode)."""
    aicore_overflow = "aicore_overflow"
    atomic_overflow = "atomic_overflow"
    all = "all"


class OpSelectImplMode(str, enum.Enum):
    """device.op_select_implmode: the adapter's values (npu_attrs.cc CheckOpImplMode)."""
    high_precision = "high_precision"
    high_performance = "high_performance"
    high_precision_for_all = "high_precision_for_all"
    high_performance_for_all = "high_performance_for_all"


class AicMetrics(str, enum.Enum):
    """device.profiling.aic_metrics: the AI Core metric groups of CANN's profiler (the adapter's default
    profiling_options use PipeUtilization; the other names are those of the profiler's AI Core metrics)."""
    PipeUtilization = "PipeUtilization"
    ArithmeticUtilization = "ArithmeticUtilization"
    Memory = "Memory"
    MemoryL0 = "MemoryL0"
    MemoryUB = "MemoryUB"
    ResourceConflictRatio = "ResourceConflictRatio"


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
    # Data parallelism with tf.distribute (effnet_exp/devices/distribute.py; cpu and gpu only): none | mirrored
    # (device.replicas devices of this host) | multi_worker (the workers TF_CONFIG lists, each started with the
    # same command). Under a strategy train.batch_size is the global batch, split evenly over the replicas.
    strategy: Strategy = Strategy.none
    # mirrored: how many devices; 0 = every visible GPU (device=gpu); device=cpu needs N >= 1 logical CPU devices.
    # multi_worker: 0 (each worker replicates over all its GPUs, or its CPU).
    replicas: int = 0


@dataclass
class LossScaleConfig:
    """device.loss_scale: loss scaling for float16 training (effnet_exp/devices/loss_scaling.py, ascend.py)."""
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
    # Without a GPU, device=gpu is an error; true runs on the CPU with a warning instead.
    allow_cpu_fallback: bool = False
    # Not measured on a GPU: off until it is.
    xla_swish_grad: bool = False
    visible_devices: Optional[str] = None
    # Automatic mixed precision: the float16 graph rewrite (variables stay float32) with loss scaling.
    mixed_precision: bool = False
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)


@dataclass
class ProfilingConfig:
    """device.profiling (Ascend): the adapter's profiling_mode + profiling_options, for the whole session (the
    adapter has no window of steps)."""
    enabled: bool = False
    # null: <run folder>/profiling (a rank's: <run folder>/rank_<k>/profiling); a relative path is taken inside
    # that folder too.
    output: Optional[str] = None
    training_trace: bool = True
    task_trace: bool = True
    aicpu: bool = True
    # The first forward and the last backward operator of a step, for the iteration trace; empty: CANN finds them.
    fp_point: str = ""
    bp_point: str = ""
    aic_metrics: AicMetrics = AicMetrics.PipeUtilization


@dataclass
class DumpConfig:
    """device.dump (Ascend): CANN's overflow dump or data dump of the training sessions."""
    mode: DumpMode = DumpMode.none
    # data dumps: which steps, "0|5|10-20" (at most 100 groups); null: every step.
    steps: Optional[str] = None
    # null: <run folder>/dump (a rank's: <run folder>/rank_<k>/dump); a relative path is taken inside it too.
    output: Optional[str] = None
    data: DumpData = DumpData.output
    overflow: OverflowKind = OverflowKind.all


@dataclass
class AscendDeviceConfig(CpuDeviceConfig):
    name: str = "ascend"
    # The NPU compiles the graph itself (CANN): no XLA.
    xla_swish_grad: bool = False
    use_off_line: bool = True
    # The float16 ones (FLOAT16_PRECISION_MODES) get loss scaling (device.loss_scale).
    precision_mode: PrecisionMode = PrecisionMode.allow_mix_precision
    mix_compile_mode: bool = False
    # Training steps per sess.run, looped on the device (> 1 needs mix_compile_mode=false). It must divide the
    # step total (an epoch-derived total is rounded up to a multiple, and logged), train.steps, train.log_every,
    # train.checkpoint_every and train.eval_every.
    iterations_per_loop: int = 1
    # JSON black/white/gray list for mixed precision; only with allow_mix_precision*.
    modify_mixlist: Optional[str] = None
    graph_memory_max_size: Optional[int] = None
    variable_memory_max_size: Optional[int] = None
    remapping: bool = False
    memory_optimization: bool = False
    # Through npu_bridge's NPULossScaleOptimizer whenever precision_mode computes in float16.
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    dump: DumpConfig = field(default_factory=DumpConfig)
    # Precision debugging (docs/ascend.md): a JSON file turning graph / UB fusions off, the operator compiler's
    # debug level (>= 0), high precision or high performance operator implementations (null: CANN's default),
    # a dump of the operators that raise an AI Core exception.
    fusion_switch_file: Optional[str] = None
    op_debug_level: int = 0
    op_select_implmode: Optional[OpSelectImplMode] = None
    enable_exception_dump: bool = False
    # Several ranks: HCCL's allreduce in parallel with the backward pass (ModelZoo's setting); HCCL's timeout in
    # seconds (null: CANN's default).
    hcom_parallel: bool = True
    hccl_timeout: Optional[int] = None


def check_loss_scale(cfg, key="device.loss_scale"):
    if cfg.scale not in ("dynamic", "none"):
        try:
            value = float(cfg.scale)
        except ValueError:
            value = None
        if value is None or value < 1:
            raise UserError("{}.scale={!r} is not dynamic, none or a number >= 1".format(key, cfg.scale))
    if cfg.init_scale < 1:
        raise UserError("{}.init_scale={} must be >= 1".format(key, cfg.init_scale))
    if cfg.incr_every_n_steps < 1 or cfg.decr_every_n_nan_or_inf < 1:
        raise UserError("{}.incr_every_n_steps and .decr_every_n_nan_or_inf must be >= 1".format(key))
    if cfg.incr_ratio <= 1 or not 0 < cfg.decr_ratio < 1:
        raise UserError("{}.incr_ratio must be > 1 and .decr_ratio in (0, 1) (got {}, {})".format(
            key, cfg.incr_ratio, cfg.decr_ratio))


def check_device(cfg):
    """The device section's own fields; rules that involve other sections are the device object's check()."""
    if cfg.intra_op_threads < 0 or cfg.inter_op_threads < 0:
        raise UserError("device.intra_op_threads and device.inter_op_threads must be >= 0 (0: TensorFlow's choice)")
    if cfg.replicas < 0:
        raise UserError("device.replicas={} must be >= 0".format(cfg.replicas))
    if cfg.strategy == Strategy.none and cfg.replicas:
        raise UserError("device.replicas={} needs device.strategy=mirrored".format(cfg.replicas))
    if cfg.strategy == Strategy.multi_worker and cfg.replicas:
        raise UserError("device.strategy=multi_worker takes device.replicas=0: each worker replicates over all "
                        "its GPUs (limit them with CUDA_VISIBLE_DEVICES) or its CPU")
    if isinstance(cfg, (GpuDeviceConfig, AscendDeviceConfig)):
        check_loss_scale(cfg.loss_scale)
    if isinstance(cfg, AscendDeviceConfig):
        _check_ascend(cfg)


def _check_ascend(cfg):
    if cfg.strategy != Strategy.none:
        raise UserError("device=ascend has its own data parallelism (python -m effnet_exp.tools.launch_ascend); "
                        "device.strategy={} is for device=cpu|gpu".format(cfg.strategy.value))
    if cfg.iterations_per_loop < 1:
        raise UserError("device.iterations_per_loop={} must be at least 1".format(cfg.iterations_per_loop))
    if cfg.iterations_per_loop > 1 and cfg.mix_compile_mode:
        raise UserError("device.iterations_per_loop={} needs device.mix_compile_mode=false (the whole step must "
                        "run on the device)".format(cfg.iterations_per_loop))
    if cfg.modify_mixlist:
        if not cfg.precision_mode.value.startswith("allow_mix_precision"):
            raise UserError("device.modify_mixlist is only used with device.precision_mode=allow_mix_precision* "
                            "(not {})".format(cfg.precision_mode.value))
        if not os.path.isfile(cfg.modify_mixlist):
            raise UserError("device.modify_mixlist={}: no such file".format(cfg.modify_mixlist))
    _check_debugging(cfg)


# The adapter's dump_step syntax (npu_attrs.cc checkDumpStep): steps and ranges a-b (a < b) joined by |.
_DUMP_STEPS = re.compile(r"\d+(-\d+)?(\|\d+(-\d+)?)*")
MAX_DUMP_STEP_GROUPS = 100


def check_dump_steps(text, key="device.dump.steps"):
    if not _DUMP_STEPS.fullmatch(text):
        raise UserError("{}={!r} is not CANN's dump_step syntax: steps and ranges joined by |, e.g. 0|5|10-20".format(
            key, text))
    groups = text.split("|")
    if len(groups) > MAX_DUMP_STEP_GROUPS:
        raise UserError("{}={!r} has {} groups; CANN dumps at most {}".format(key, text, len(groups),
                                                                          MAX_DUMP_STEP_GROUPS))
    for group in groups:
        ends = [int(n) for n in group.split("-")]
        if len(ends) == 2 and ends[0] >= ends[1]:
            raise UserError("{}={!r}: the range {} must go from a smaller to a larger step".format(key, text, group))


def _check_debugging(cfg):
    dump = cfg.dump
    if dump.steps is not None:
        if dump.mode != DumpMode.data:
            raise UserError("device.dump.steps={!r} is only used with device.dump.mode=data (not {})".format(
                dump.steps, dump.mode.value))
        check_dump_steps(dump.steps)
    if cfg.fusion_switch_file and not os.path.isfile(cfg.fusion_switch_file):
        raise UserError("device.fusion_switch_file={}: no such file".format(cfg.fusion_switch_file))
    if cfg.op_debug_level < 0:
        raise UserError("device.op_debug_level={} must be >= 0".format(cfg.op_debug_level))
    if cfg.hccl_timeout is not None and cfg.hccl_timeout < 1:
        raise UserError("device.hccl_timeout={} must be a number of seconds >= 1 (or null)".format(cfg.hccl_timeout))
