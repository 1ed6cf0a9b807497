"""A model's stages, parameter counts and multiply-adds, read off its real graph (effnet_exp.tools.model_summary).

Multiply-adds are those of the convolutions, the depthwise convolutions and the classifier at batch 1 (the
convention of the EfficientNet papers' "FLOPs"): a k x k convolution to an H x W x C_out output from C_in channels
is H * W * k * k * C_in * C_out, a depthwise one H * W * k * k * C, the classifier C_in * classes. Batch norm,
activations, pooling, the squeeze-excitation product and the residual additions are not counted.
"""
import collections
import re

import tensorflow as tf

from effnet_exp.model.blocks import CONV_TYPES, has_se
from effnet_exp.model.config import input_size
from effnet_exp.model.efficientnet import build_efficientnet, scaled_stages, stem_and_head_filters

__all__ = ["Stage", "Summary", "summarize"]

Stage = collections.namedtuple("Stage", ["name", "kind", "repeats", "kernel", "stride", "expansion", "se",
                                         "channels", "size", "params", "flops"])
Summary = collections.namedtuple("Summary", ["model", "image_size", "stages", "params", "trainable_params",
                                             "flops"])

_BLOCK = re.compile(r"/blocks_(\d+)/")


def op_flops(op):
    """Multiply-adds of one Conv2D, DepthwiseConv2dNative or MatMul op at its static shapes; 0 for other ops."""
    if op.type not in ("Conv2D", "DepthwiseConv2dNative", "MatMul"):
        return 0
    out = op.outputs[0].shape.as_list()
    kernel = op.inputs[1].shape.as_list()
    if op.type == "MatMul":
        return out[0] * kernel[0] * kernel[1]
    per_output = kernel[0] * kernel[1] * (kernel[2] if op.type == "Conv2D" else 1)
    return out[0] * out[1] * out[2] * out[3] * per_output


def _parts(cfg):
    """Part of the model by built block index: 'stem', 'head' or the stage's number (1-based), and the stages."""
    stages = scaled_stages(cfg)
    owner = []
    for number, stage in enumerate(stages, 1):
        owner += [number] * stage.num_repeat
    return owner, stages


def _part_of(name, scope, owner):
    found = _BLOCK.search(name)
    if found:
        return owner[int(found.group(1))]
    return "stem" if name.startswith(scope + "/stem/") else "head"


def _add(totals, key, amount):
    totals[key] = totals.get(key, 0) + amount


def summarize(cfg):
    """Summary of cfg's model at input_size(cfg): one Stage for the stem, each block string and the head, and the
    totals (every model variable, the trainable ones, multiply-adds). Builds the training graph (batch norm
    unfolded, so each convolution appears once) in a graph of its own."""
    size = input_size(cfg)
    owner, stages = _parts(cfg)
    with tf.Graph().as_default() as graph:
        _, endpoints = build_efficientnet(tf.zeros([1, size, size, 3]), cfg, is_training=True)
        variables = [v for v in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
                     if v.op.name.startswith(cfg.name + "/")]
        trainable = set(graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES))
        params, flops = {}, {}
        for v in variables:
            _add(params, _part_of(v.op.name, cfg.name, owner), v.shape.num_elements())
        for op in graph.get_operations():
            if op.name.startswith(cfg.name + "/") and "gradients" not in op.name:
                amount = op_flops(op)
                if amount:
                    _add(flops, _part_of(op.name, cfg.name, owner), amount)
        shapes = {key: t.shape.as_list() for key, t in endpoints.items()}
        trainable_count = sum(v.shape.num_elements() for v in variables if v in trainable)
    rows = [_stem_row(shapes, params, flops)]
    last = -1
    for number, stage in enumerate(stages, 1):
        last += stage.num_repeat
        rows.append(Stage(str(number), CONV_TYPES[stage.conv_type], stage.num_repeat, stage.kernel_size,
                          stage.strides[0], stage.expand_ratio, float(stage.se_ratio) if has_se(stage) else None,
                          stage.output_filters, shapes["block_%d" % last][1], params.get(number, 0),
                          flops.get(number, 0)))
    rows.append(_head_row(cfg, shapes, params, flops))
    return Summary(cfg.name, size, rows, sum(params.values()), trainable_count, sum(flops.values()))


def _stem_row(shapes, params, flops):
    stem = shapes["stem"]
    return Stage("stem", "Conv3x3", 1, 3, 2, None, None, stem[3], stem[1], params.get("stem", 0),
                 flops.get("stem", 0))


def _head_row(cfg, shapes, params, flops):
    features = shapes["features"]
    head_filters = stem_and_head_filters(cfg)[1]
    return Stage("head", "Conv1x1+pool+dense", 1, 1, 1, None, None, head_filters, features[1],
                 params.get("head", 0), flops.get("head", 0))
