"""device=gpu: memory growth, visible devices and automatic mixed precision with loss scaling."""
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.devices.base import Device
from effnet_exp.devices.loss_scaling import gpu_loss_scaling


class GpuDevice(Device):
    name = "gpu"

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
