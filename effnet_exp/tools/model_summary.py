"""One row per stage of a model, and its parameters and multiply-adds (V1, Lite and V2 alike).

    python -m effnet_exp.tools.model_summary model=<variant> [model.image_size=N] [other model.* overrides]
                                             [--json PATH]

The overrides are run.py's: the model is composed as `python run.py <overrides>` would compose it. Without a
`dataset...` or `model.num_classes` override the classifier has ImageNet's 1000 classes, as published.
Multiply-adds are counted at the model's input size (model.image_size, else the variant's resolution) on the
convolutions and the classifier (effnet_exp/model/summary.py). --json writes
{"model", "image_size", "params", "trainable_params", "flops"} (flops = multiply-adds).
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import: no C++ start-up banner


from effnet_exp.config import compose_run_config  # noqa: E402
from effnet_exp.errors import UserError  # noqa: E402
from effnet_exp.model.config import check_model  # noqa: E402
from effnet_exp.model.summary import summarize  # noqa: E402
from effnet_exp.run_folder import atomic_write_json  # noqa: E402

IMAGENET_CLASSES = "dataset.num_classes=1000"


def model_config(overrides):
    """The ModelConfig run.py would build from overrides (1000 classes unless they set the class count);
    UserError for a bad override or model value."""
    overrides = list(overrides)
    own_classes = any(o.lstrip("+~").startswith(("dataset", "model.num_classes")) for o in overrides)
    cfg = compose_run_config(overrides, () if own_classes else [IMAGENET_CLASSES])
    if cfg.model.image_size is not None and cfg.model.image_size < 8:
        raise UserError("model.image_size={} must be at least 8".format(cfg.model.image_size))
    return check_model(cfg.model)


def _cell(value, spec="{}"):
    return "-" if value is None else spec.format(value)


def table(summary):
    """The summary as Markdown lines."""
    lines = ["{}: {}x{} input".format(summary.model, summary.image_size, summary.image_size), "",
             "| stage | block | repeats | kernel | stride | expansion | SE | channels | output size | params "
             "| multiply-adds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary.stages:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {}x{} | {:,} | {:,} |".format(
            s.name, s.kind, s.repeats, s.kernel, s.stride, _cell(s.expansion), _cell(s.se, "{:g}"), s.channels,
            s.size, s.size, s.params, s.flops))
    lines += ["", "params {:,} (trainable {:,}); multiply-adds {:,} ({:.3f} B) at {}x{}".format(
        summary.params, summary.trainable_params, summary.flops, summary.flops / 1e9, summary.image_size,
        summary.image_size)]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effnet_exp.tools.model_summary",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run.py overrides (model=... ...)")
    parser.add_argument("--json", help="also write the totals here")
    args = parser.parse_intermixed_args(argv)
    try:
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise UserError("{} is not a key=value override".format(bad[0]))
        summary = summarize(model_config(args.overrides))
        print("\n".join(table(summary)))
        if args.json:
            write_json(args.json, summary)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    return 0


def write_json(path, summary):
    """The totals, written whole or not at all; UserError naming a path that cannot be written."""
    try:
        atomic_write_json(path, {"model": summary.model, "image_size": summary.image_size, "params": summary.params,
                                 "trainable_params": summary.trainable_params, "flops": summary.flops})
    except (IOError, OSError) as err:
        raise UserError("--json {}: cannot write it ({})".format(path, err.strerror or err))


if __name__ == "__main__":
    sys.exit(main())
