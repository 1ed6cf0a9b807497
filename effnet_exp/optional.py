"""The one place that imports heavy or optional packages, lazily."""
from effnet_exp.errors import UserError


def import_npu_bridge():
    """Huawei's CANN TensorFlow adapter; registers the NPU ops and optimizers when imported."""
    try:
        from npu_bridge import npu_init  # noqa: F401  (import registers the NPU ops)
    except ImportError as err:
        raise UserError(
            "device=ascend needs Huawei's npu_bridge (the CANN TensorFlow adapter, installed with CANN, "
            "not from PyPI), which cannot be imported here ({}); use device=cpu or device=gpu, or run on an "
            "Ascend image".format(err))
    return npu_init
