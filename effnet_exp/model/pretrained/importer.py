"""A PyTorch EfficientNet(-Lite) state dict as a TF checkpoint with this project's variable names.

The model graph is built from ``conf/model/<variant>.yaml`` (``num_classes`` from the file's ``_fc``), every
model variable is matched (strictly: a missing, unused or mis-shaped tensor is an error, see name_map) and the
values are written to ``<folder>/model.ckpt`` (+ the ``checkpoint`` state file, relative paths) and
``<folder>/import.json``. :func:`ensure_imported` does this once per variant into a cache folder.
"""
import collections
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from omegaconf import OmegaConf

from effnet_exp.errors import UserError
from effnet_exp.model.config import ModelConfig, input_size
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.pretrained.name_map import convert_state_dict
from effnet_exp.model.pretrained.packages import canonical_variant, default_source
from effnet_exp.model.pretrained.torch_pickle import load_state_dict

CHECKPOINT_NAME = "model.ckpt"
INFO_NAME = "import.json"

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
MODEL_CONF_DIR = os.path.join(_REPO, "conf", "model")


def _available_variants():
    if not os.path.isdir(MODEL_CONF_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(MODEL_CONF_DIR) if f.endswith(".yaml"))


def load_model_config(variant, num_classes=1000):
    """The ModelConfig of ``conf/model/<variant>.yaml``."""
    variant = canonical_variant(variant)
    path = os.path.join(MODEL_CONF_DIR, variant + ".yaml")
    if not os.path.isfile(path):
        raise UserError("unknown model variant {!r} (no {}); known: {}".format(
            variant, path, ", ".join(_available_variants())))
    values = OmegaConf.load(path)
    if "defaults" in values:
        values.pop("defaults")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig(num_classes=int(num_classes))),
                                               values))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checkpoint(cfg, state_dict, src, prefix):
    """Builds cfg's model, loads the converted state dict into it and saves it; returns the variable count."""
    with tf.Graph().as_default() as graph:
        size = input_size(cfg)
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
    return len(variables)


def import_weights(variant, out_dir, src=None):
    """Imports ``src`` (default: the variant's weights package) into ``out_dir``; returns the prefix."""
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
    num_variables = _write_checkpoint(cfg, state_dict, src, prefix)
    info = collections.OrderedDict([
        ("variant", variant),
        ("model_name", str(cfg.name)),
        ("source", src),
        ("sha256", _sha256(src)),
        ("num_classes", num_classes),
        ("variables", num_variables),
        ("checkpoint", CHECKPOINT_NAME),
    ])
    with open(os.path.join(out_dir, INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    return prefix


def read_info(folder):
    """The import.json of an import folder, or None."""
    try:
        with open(os.path.join(folder, INFO_NAME)) as f:
            return json.load(f)
    except (IOError, OSError, ValueError):
        return None


def _complete(folder, variant):
    info = read_info(folder)
    return (info is not None and info.get("variant") == variant
            and os.path.isfile(os.path.join(folder, "checkpoint"))
            and os.path.isfile(os.path.join(folder, CHECKPOINT_NAME + ".index")))


def _package_changed(folder, variant):
    """True when the installed weights package now ships a different file than the cached import."""
    try:
        src = default_source(variant)
    except UserError:
        return False  # the package is gone: the cached import is all there is
    return _sha256(src) != (read_info(folder) or {}).get("sha256")


def _reusable(folder, variant):
    return _complete(folder, variant) and not _package_changed(folder, variant)


def ensure_imported(variant, cache_dir):
    """Imports the variant's packaged weights once into ``<cache_dir>/pretrained/<variant>``.

    Returns the checkpoint prefix. A complete earlier import is reused (unless the installed package
    now ships a different file); a new one is written to a temporary folder beside it and renamed into
    place, so an interrupted import never looks complete. UserError when the weights package is not
    installed.
    """
    variant = canonical_variant(variant)
    final = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "pretrained", variant)
    if _reusable(final, variant):
        return os.path.join(final, CHECKPOINT_NAME)
    src = default_source(variant)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".%s.tmp-" % variant, dir=parent)
    try:
        import_weights(variant, tmp, src)
        if os.path.exists(final):
            if _reusable(final, variant):
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
