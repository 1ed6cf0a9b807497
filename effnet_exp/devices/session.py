"""tf.compat.v1.ConfigProto for each device; the Ascend one carries the NpuOptimizer custom optimizer."""
import os

import tensorflow as tf
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.errors import UserError
from effnet_exp.optional import import_npu_bridge

# CANN's precision_mode values (the TF adapter's npu_attrs.cc, and the ATC/GE "precision_mode" reference).
PRECISION_MODES = ("allow_mix_precision", "allow_mix_precision_fp16", "allow_mix_precision_bf16",
                   "allow_fp32_to_fp16", "allow_fp32_to_bf16", "must_keep_origin_dtype", "force_fp32",
                   "cube_fp16in_fp32out", "force_fp16")
# Those that compute (some) ops in float16, so gradients can underflow/overflow: they get loss scaling.
# force_fp32 / cube_fp16in_fp32out feed matrix ops float16 inputs too; the bf16 modes and
# must_keep_origin_dtype (a float32 graph stays float32) do not need it.
FLOAT16_PRECISION_MODES = ("allow_mix_precision", "allow_mix_precision_fp16", "allow_fp32_to_fp16",
                           "force_fp32", "cube_fp16in_fp32out", "force_fp16")


def check_device_available(device_cfg):
    """Fail at once, before any graph or run file, when the device cannot be used here or is misconfigured."""
    if device_cfg.name == "ascend":
        import_npu_bridge()
        check_ascend_config(device_cfg)
    elif device_cfg.name not in ("cpu", "gpu"):
        raise UserError("device.name={!r} is not one of cpu, gpu, ascend".format(device_cfg.name))
    if getattr(device_cfg, "loss_scale", None) is not None:
        from effnet_exp.devices.loss_scaling import check_loss_scale_config
        check_loss_scale_config(device_cfg.loss_scale)


def check_ascend_config(device_cfg):
    from effnet_exp.devices.ascend_env import read_ascend_env

    if device_cfg.precision_mode not in PRECISION_MODES:
        raise UserError("device.precision_mode={!r} is not one of {}".format(
            device_cfg.precision_mode, ", ".join(PRECISION_MODES)))
    if device_cfg.iterations_per_loop < 1:
        raise UserError("device.iterations_per_loop={} must be at least 1".format(device_cfg.iterations_per_loop))
    if device_cfg.iterations_per_loop > 1 and device_cfg.mix_compile_mode:
        raise UserError("device.iterations_per_loop={} needs device.mix_compile_mode=false (the whole step must "
                        "run on the device)".format(device_cfg.iterations_per_loop))
    if device_cfg.modify_mixlist:
        if not device_cfg.precision_mode.startswith("allow_mix_precision"):
            raise UserError("device.modify_mixlist is only used with device.precision_mode=allow_mix_precision* "
                            "(not {})".format(device_cfg.precision_mode))
        if not os.path.isfile(device_cfg.modify_mixlist):
            raise UserError("device.modify_mixlist={}: no such file".format(device_cfg.modify_mixlist))
    read_ascend_env()  # RANK_SIZE, RANK_ID, RANK_TABLE_FILE, ASCEND_DEVICE_ID: one error naming the variable


def make_session_config(device_cfg):
    config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
    config.intra_op_parallelism_threads = device_cfg.intra_op_threads
    config.inter_op_parallelism_threads = device_cfg.inter_op_threads
    if device_cfg.xla:
        config.graph_options.optimizer_options.global_jit_level = tf.compat.v1.OptimizerOptions.ON_1
        if device_cfg.name == "cpu":
            # XLA auto-clustering only considers CPU ops when this flag is set before the first session.
            flags = os.environ.get("TF_XLA_FLAGS", "")
            if "--tf_xla_cpu_global_jit" not in flags:
                os.environ["TF_XLA_FLAGS"] = (flags + " --tf_xla_cpu_global_jit").strip()
    if device_cfg.name == "gpu":
        config.gpu_options.allow_growth = device_cfg.allow_growth
        if device_cfg.visible_devices is not None:
            config.gpu_options.visible_device_list = str(device_cfg.visible_devices)
        if getattr(device_cfg, "mixed_precision", False):
            # The session half of tf.compat.v1.train.experimental.enable_mixed_precision_graph_rewrite (the
            # optimizer half is in loss_scaling.py), set per session instead of process-wide.
            config.graph_options.rewrite_options.auto_mixed_precision = RewriterConfig.ON
    elif device_cfg.name == "ascend":
        _add_npu_optimizer(config, device_cfg)
    return config


def _add_npu_optimizer(config, device_cfg):
    import_npu_bridge()
    custom_op = config.graph_options.rewrite_options.custom_optimizers.add()
    custom_op.name = "NpuOptimizer"
    params = custom_op.parameter_map
    params["use_off_line"].b = device_cfg.use_off_line
    params["precision_mode"].s = tf.compat.as_bytes(device_cfg.precision_mode)
    params["mix_compile_mode"].b = device_cfg.mix_compile_mode
    params["iterations_per_loop"].i = device_cfg.iterations_per_loop
    if device_cfg.iterations_per_loop > 1:
        # The loop runs on the device and takes its batches from the in-graph iterator (GetNext sunk there).
        params["enable_data_pre_proc"].b = True
    if device_cfg.modify_mixlist:
        params["modify_mixlist"].s = tf.compat.as_bytes(device_cfg.modify_mixlist)
    if device_cfg.graph_memory_max_size:
        params["graph_memory_max_size"].s = tf.compat.as_bytes(str(device_cfg.graph_memory_max_size))
    if device_cfg.variable_memory_max_size:
        params["variable_memory_max_size"].s = tf.compat.as_bytes(str(device_cfg.variable_memory_max_size))
    rewrite = config.graph_options.rewrite_options
    rewrite.remapping = RewriterConfig.ON if device_cfg.remapping else RewriterConfig.OFF
    rewrite.memory_optimization = (
        RewriterConfig.DEFAULT_MEM_OPT if device_cfg.memory_optimization else RewriterConfig.OFF)
