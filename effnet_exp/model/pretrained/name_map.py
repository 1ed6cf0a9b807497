"""PyTorch EfficientNet(-Lite) state-dict keys -> this project's variable names, with the layout transforms.

The state dict follows the ``efficientnet_lite_pytorch`` port (the lukemelas EfficientNet-PyTorch layout):
``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` /
[``_se_reduce`` / ``_se_expand``] / ``_project_conv`` / ``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``.
"""
import collections

import numpy as np

from effnet_exp.errors import UserError
from effnet_exp.model.blocks import has_se
from effnet_exp.model.efficientnet import expand_block_args

_BN = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"),
       ("moving_variance", "running_var"))
_IGNORED_SUFFIX = ".num_batches_tracked"


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
