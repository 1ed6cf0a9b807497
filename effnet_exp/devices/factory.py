"""make_device(cfg.device): the one object that knows the backend (base.py). Imports TensorFlow."""
from effnet_exp.devices.ascend import AscendDevice
from effnet_exp.devices.config import AscendDeviceConfig, CpuDeviceConfig, GpuDeviceConfig
from effnet_exp.devices.cpu import CpuDevice
from effnet_exp.devices.gpu import GpuDevice

_BACKENDS = {CpuDeviceConfig: CpuDevice, GpuDeviceConfig: GpuDevice, AscendDeviceConfig: AscendDevice}


def make_device(device_cfg, environ=None):
    """The Device for a device schema (cpu, gpu or ascend); environ (default os.environ) for ranks and TF_CONFIG."""
    return _BACKENDS[type(device_cfg)](device_cfg, environ)
