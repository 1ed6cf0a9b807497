"""tf.compat.v1.ConfigProto for each device; the Ascend one carries the NpuOptimizer custom optimizer."""
import os

import tensorflow as tf
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.errors import UserError
from effnet_exp.optional import import_npu_bridge


def check_device_available(device_cfg):
    """Fail at once, before any graph or run file, when the device cannot be used here."""
    if device_cfg.name == "ascend":
        import_npu_bridge()
    elif device_cfg.name not in ("cpu", "gpu"):
        raise UserError("device.name={!r} is not one of cpu, gpu, ascend".format(device_cfg.name))


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
