"""device=gpu: memory growth, visible devices and automatic mixed precision with loss scaling."""
import logging

import tensorflow as tf
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.devices.base import Device
from effnet_exp.devices.loss_scaling import gpu_loss_scaling
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)


def visible_gpus():
    """The GPUs TensorFlow sees in this process (before device.visible_devices)."""
    return tf.config.experimental.list_physical_devices("GPU")


def _no_gpu_reason():
    build = "a build with CUDA" if tf.test.is_built_with_cuda() else "a CPU-only build"
    return "TensorFlow {} ({}) sees no GPU".format(tf.__version__, build)


class GpuDevice(Device):
    name = "gpu"

    def check(self, run_cfg):
        if not visible_gpus():
            if not self.cfg.allow_cpu_fallback:
                raise UserError("device=gpu, but {}; use device=cpu, or device.allow_cpu_fallback=true to run on "
                                "the CPU anyway".format(_no_gpu_reason()))
            log.warning("device=gpu, but %s: running on the CPU (device.allow_cpu_fallback=true)", _no_gpu_reason())
        super(GpuDevice, self).check(run_cfg)

    def describe(self):
        gpus = visible_gpus()
        if not gpus:
            return "device=gpu: no GPU, the CPU ({}, device.allow_cpu_fallback=true)".format(_no_gpu_reason())
        names = ", ".join(gpu.name for gpu in gpus)
        chosen = self.cfg.visible_devices
        return "device=gpu: {} ({}{}){}".format(names, "TensorFlow " + tf.__version__,
                                                ", device.visible_devices={}".format(chosen) if chosen else "",
                                                self._replicas_text())

    def session_config(self, purpose):
        config = super(GpuDevice, self).session_config(purpose)
        config.gpu_options.allow_growth = self.cfg.allow_growth
        if self.cfg.visible_devices is not None:
            config.gpu_options.visible_device_list = str(self.cfg.visible_devices)
        if self.cfg.mixed_precision:
            # The session half of tf.compat.v1.train.experimental.enable_mixed_precision_graph_rewrite (the
            # optimizer half is wrap_optimizer's), set per session instead of process-wide.
            config.graph_options.rewrite_options.auto_mixed_precision = RewriterConfig.ON
        return config

    def wrap_optimizer(self, optimizer):
        if not self.cfg.mixed_precision or self.cfg.loss_scale.scale == "none":
            return optimizer, None
        return gpu_loss_scaling(optimizer, self.cfg.loss_scale)
