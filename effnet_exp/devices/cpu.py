"""device=cpu."""
import os

from effnet_exp.devices.base import Device


class CpuDevice(Device):
    name = "cpu"

    def session_config(self, purpose):
        config = super(CpuDevice, self).session_config(purpose)
        if self.cfg.xla:
            # XLA auto-clustering only considers CPU ops when this flag is set before the first session.
            flags = os.environ.get("TF_XLA_FLAGS", "")
            if "--tf_xla_cpu_global_jit" not in flags:
                os.environ["TF_XLA_FLAGS"] = (flags + " --tf_xla_cpu_global_jit").strip()
        return config
