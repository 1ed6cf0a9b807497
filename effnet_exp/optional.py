"""The one place that imports heavy or optional packages, lazily: npu_bridge (Ascend images only), matplotlib
(figures), Pillow (the TFRecord converter's workers), scikit-learn's datasets (slow, needed once), Keras (the
benchmark's other side) and MLflow (+logger=mlflow)."""
import importlib
import os
from collections import namedtuple

from effnet_exp.errors import UserError

# The names of Huawei's CANN TensorFlow adapter that effnet-exp uses, and the modules that define them.
# `npu_bridge.npu_init` re-exports all of them; the submodules are the fallback for adapters that do not.
NPU_NAMES = {
    "NPUDistributedOptimizer": "npu_bridge.estimator.npu.npu_optimizer",
    "NPULossScaleOptimizer": "npu_bridge.estimator.npu.npu_loss_scale_optimizer",
    "FixedLossScaleManager": "npu_bridge.estimator.npu.npu_loss_scale_manager",
    "ExponentialUpdateLossScaleManager": "npu_bridge.estimator.npu.npu_loss_scale_manager",
    "hccl_ops": "npu_bridge.hccl",
    "util": "npu_bridge.estimator.npu",
}


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


# font_file: the TrueType font matplotlib ships (DejaVu Sans), for the captions Pillow draws (eval_plots).
Matplotlib = namedtuple("Matplotlib", "Figure FigureCanvasAgg MaxNLocator Line2D font_file")


def matplotlib():
    """The parts of matplotlib the figures use, with the headless Agg backend chosen before anything else."""
    import matplotlib as mpl
    mpl.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    font_file = os.path.join(mpl.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return Matplotlib(Figure, FigureCanvasAgg, MaxNLocator, Line2D, font_file)


def pil_image(user):
    """PIL.Image; UserError naming `user` (the tool that needs it) without Pillow."""
    try:
        from PIL import Image
    except ImportError as err:
        raise UserError("{} needs Pillow ({}); install it with: pip install pillow".format(user, err))
    return Image


Mlflow = namedtuple("Mlflow", "MlflowClient Metric Param RunTag version")


def mlflow():
    """MLflow's tracking client and entities; UserError saying how to install it."""
    try:
        import mlflow as module
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError as err:
        raise UserError("+logger=mlflow needs MLflow, which cannot be imported here ({}); install it with: "
                        "pip install mlflow-skinny (or pip install -r requirements-test.txt)".format(err))
    return Mlflow(MlflowClient, Metric, Param, RunTag, module.__version__)


def load_digits():
    """scikit-learn's bundled 8x8 digits (scikit-learn is slow to import, and this is needed once)."""
    from sklearn.datasets import load_digits as load

    return load()


def keras():
    """Keras 3, or None where it is not installed (the TF 1.15 stack)."""
    try:
        import keras as module
    except ImportError:
        return None
    return module if module.__version__.startswith("3") else None


def npu(name):
    """One name of the adapter (see NPU_NAMES): npu("NPULossScaleOptimizer"), npu("hccl_ops"), ..."""
    npu_init = import_npu_bridge()
    found = getattr(npu_init, name, None)
    if found is not None:
        return found
    module = NPU_NAMES[name]
    try:
        found = getattr(importlib.import_module(module), name, None)
        return found if found is not None else importlib.import_module(module + "." + name)
    except ImportError as err:
        raise UserError("this npu_bridge has no {} (looked in npu_bridge.npu_init and {}): {}".format(
            name, module, err))
