"""EfficientNet in tf.compat.v1 graph mode, variable-compatible with the official
checkpoints (tensorflow/tpu models/official/efficientnet).

Variable layout under ``cfg.name`` (e.g. ``efficientnet-b0``)::

    stem/conv2d/kernel, stem/tpu_batch_normalization/*
    blocks_<i>/ (i numbered globally across stages)
        expand_ratio != 1:
            conv2d (expand), tpu_batch_normalization (bn0),
            depthwise_conv2d, tpu_batch_normalization_1 (bn1),
            se/conv2d, se/conv2d_1, conv2d_1 (project), tpu_batch_normalization_2
        expand_ratio == 1:
            depthwise_conv2d, tpu_batch_normalization,
            se/conv2d, se/conv2d_1, conv2d (project), tpu_batch_normalization_1
    head/conv2d/kernel, head/tpu_batch_normalization/*, head/dense/{kernel,bias}

``se/`` is omitted for blocks without squeeze-excitation (se ratio absent/0).

Fused-MBConv blocks (EfficientNetV2, block strings with ``c1``; google/automl
``efficientnetv2/effnetv2_model.py:FusedMBConvBlock``) are named the same way, by order of creation:
    expand_ratio != 1: conv2d (k x k expand, the block's stride), tpu_batch_normalization,
        [se/conv2d, se/conv2d_1], conv2d_1 (1x1 project), tpu_batch_normalization_1
    expand_ratio == 1: conv2d (k x k project, the block's stride), tpu_batch_normalization, then the activation
EfficientNetV2 variants live under their own scope (``efficientnetv2-s/...``), the authors' model name.

EfficientNet-Lite (``cfg.fix_head_stem``, as the reference ``efficientnet_lite_builder.py``):
the stem and head filters are not width-scaled, the first and the last stage keep their
repeat count (no depth scaling), and the first block takes the stem's (unscaled) filters as
its input. Lite block strings carry no ``se`` field and the activation is relu6.
"""
import tensorflow as tf

from effnet_exp.model import layers
from effnet_exp.model.blocks import decode_blocks, has_se, is_fused, round_filters, round_repeats

__all__ = [
    "build_efficientnet",
    "expand_block_args",
    "scaled_stages",
    "stem_and_head_filters",
    "count_trainable_params",
]


def scaled_filters(cfg, filters):
    """round_filters with cfg's width coefficient, divisor, minimum depth and rounding rule."""
    return round_filters(filters, cfg.width_coefficient, cfg.depth_divisor, cfg.min_depth, cfg.filters_min_ratio)


def stem_and_head_filters(cfg):
    """(stem filters, head filters): width-scaled, or as configured when ``cfg.fix_head_stem``."""
    if cfg.fix_head_stem:
        return cfg.stem_filters, cfg.head_filters
    return scaled_filters(cfg, cfg.stem_filters), scaled_filters(cfg, cfg.head_filters)


def scaled_stages(cfg):
    """One BlockArgs per stage (block string), width- and depth-scaled: its first block, with num_repeat the
    stage's scaled repeat count.

    Stage repeats are scaled with round_repeats(depth_coefficient) and filters
    with round_filters(width_coefficient). With ``cfg.fix_head_stem`` (EfficientNet-Lite) the
    first and the last stage keep their repeats and the first stage's input
    filters are the (unscaled) stem filters.
    """
    stages = decode_blocks(cfg.blocks)
    result = []
    for i, stage in enumerate(stages):
        fixed = cfg.fix_head_stem and (i == 0 or i == len(stages) - 1)
        input_filters = scaled_filters(cfg, stage.input_filters)
        if cfg.fix_head_stem and i == 0:
            input_filters = stem_and_head_filters(cfg)[0]
        result.append(stage._replace(
            input_filters=input_filters,
            output_filters=scaled_filters(cfg, stage.output_filters),
            num_repeat=stage.num_repeat if fixed else round_repeats(stage.num_repeat, cfg.depth_coefficient),
        ))
    return result


def expand_block_args(cfg):
    """Returns the per-block BlockArgs (one per built block, global order): each stage of scaled_stages(cfg)
    repeated; the first block of a stage keeps the stage's stride and input filters, the repeats use stride 1
    and input = output filters.
    """
    result = []
    for stage in scaled_stages(cfg):
        result.append(stage)
        repeat = stage._replace(input_filters=stage.output_filters, strides=(1, 1))
        for _ in range(stage.num_repeat - 1):
            result.append(repeat)
    return result


def _squeeze_excite(x, args, filters, act):
    """Squeeze-excitation of x (``filters`` channels), reduced to ratio x the block's input filters."""
    num_reduced = max(1, int(args.input_filters * float(args.se_ratio)))
    with tf.compat.v1.variable_scope("se", use_resource=True):
        s = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        s = act(layers.conv2d(s, num_reduced, 1, use_bias=True, name="conv2d"))
        s = layers.conv2d(s, filters, 1, use_bias=True, name="conv2d_1")
        return tf.sigmoid(s) * x


def _mbconv_block(x, args, is_training, bn_training, act, survival_prob, bn_momentum, bn_epsilon,
                  endpoints=None):
    """One MBConv or fused-MBConv block inside the current ``blocks_<i>`` variable scope.

    Fused (conv type 1): the expand conv is the full k x k conv with the block's stride and there is no depthwise
    conv; without expansion the project conv is that k x k conv, followed by the activation."""
    inputs = x
    fused = is_fused(args)
    bn_names = iter(
        ["tpu_batch_normalization"]
        + ["tpu_batch_normalization_%d" % i for i in range(1, 3)]
    )
    conv_names = iter(["conv2d", "conv2d_1"])

    def bn(t):
        return layers.batch_norm(t, bn_training, bn_momentum, bn_epsilon, name=next(bn_names))

    filters = args.input_filters * args.expand_ratio
    if args.expand_ratio != 1:
        kernel, strides = (args.kernel_size, args.strides) if fused else (1, 1)
        x = act(bn(layers.conv2d(x, filters, kernel, strides, name=next(conv_names))))
    if endpoints is not None:
        endpoints["expansion_output"] = x

    if not fused:
        x = layers.depthwise_conv2d(x, args.kernel_size, args.strides, name="depthwise_conv2d")
        x = act(bn(x))
        if endpoints is not None:
            endpoints["depthwise_output"] = x

    if has_se(args):
        x = _squeeze_excite(x, args, filters, act)

    if fused and args.expand_ratio == 1:
        x = act(bn(layers.conv2d(x, args.output_filters, args.kernel_size, args.strides, name=next(conv_names))))
    else:
        x = bn(layers.conv2d(x, args.output_filters, 1, name=next(conv_names)))

    if (args.id_skip and all(int(s) == 1 for s in args.strides)
            and args.input_filters == args.output_filters):
        x = layers.drop_connect(x, is_training, survival_prob)
        x = tf.add(x, inputs)
    return x


def build_efficientnet(images, cfg, is_training, reuse=None, freeze_bn=False, xla_swish_grad=False):
    """Builds EfficientNet on ``images`` (float32 NHWC, already normalised).

    Args:
      images: float32 tensor [B, H, W, 3].
      cfg: a ModelConfig (or its structured DictConfig).
      is_training: Python bool; selects batch statistics + UPDATE_OPS,
        drop-connect and dropout.
      reuse: passed to the top-level variable scope ``cfg.name``.
      xla_swish_grad: training graphs on TF 2.x: swish's gradient as one XLA kernel
        (``layers.swish_xla_grad``; the device config's ``xla_swish_grad``).

    Returns:
      (logits, endpoints): logits [B, num_classes] produced by an op named
      ``logits`` (at graph root when called outside any name scope), and a dict
      of intermediate tensors: ``stem``, ``block_<i>``, ``reduction_1..5``,
      ``reduction_<k>/expansion_output``, ``features`` (head activations),
      ``pooled_features``, ``head`` (pre-identity logits), ``logits``.
    """
    if not isinstance(is_training, bool):
        is_training = layers._static_bool(is_training)
    # freeze_bn: batch norm uses (and keeps) its moving statistics even while the rest trains.
    bn_training = is_training and not freeze_bn
    act = layers.get_activation(cfg.activation, is_training, xla_swish_grad=xla_swish_grad)
    stem_filters, head_filters = stem_and_head_filters(cfg)
    bn_momentum = cfg.batch_norm_momentum
    bn_epsilon = cfg.batch_norm_epsilon
    base_survival = cfg.survival_prob
    dropout_rate = cfg.dropout_rate
    num_classes = cfg.num_classes

    blocks = expand_block_args(cfg)
    num_blocks = len(blocks)
    endpoints = {}

    with tf.compat.v1.variable_scope(cfg.name, reuse=reuse, use_resource=True):
        with tf.compat.v1.variable_scope("stem"):
            x = layers.conv2d(images, stem_filters, 3, 2, name="conv2d")
            x = act(layers.batch_norm(x, bn_training, bn_momentum, bn_epsilon))
        endpoints["stem"] = x

        reduction_idx = 0
        for idx, args in enumerate(blocks):
            is_reduction = idx == num_blocks - 1 or blocks[idx + 1].strides[0] > 1
            if is_reduction:
                reduction_idx += 1
            survival_prob = None
            if base_survival:
                survival_prob = 1.0 - (1.0 - float(base_survival)) * float(idx) / num_blocks
            block_endpoints = {}
            with tf.compat.v1.variable_scope("blocks_%d" % idx):
                x = _mbconv_block(
                    x, args, is_training, bn_training, act, survival_prob, bn_momentum, bn_epsilon,
                    endpoints=block_endpoints,
                )
            endpoints["block_%d" % idx] = x
            if is_reduction:
                prefix = "reduction_%d" % reduction_idx
                endpoints[prefix] = x
                for key, value in block_endpoints.items():
                    endpoints["%s/%s" % (prefix, key)] = value

        with tf.compat.v1.variable_scope("head"):
            x = layers.conv2d(x, head_filters, 1, name="conv2d")
            x = act(layers.batch_norm(x, bn_training, bn_momentum, bn_epsilon))
            endpoints["features"] = x
            x = tf.reduce_mean(x, axis=[1, 2])
            endpoints["pooled_features"] = x
            if is_training and dropout_rate > 0:
                x = tf.nn.dropout(x, rate=dropout_rate)
            x = layers.dense(x, num_classes, name="dense")
            endpoints["head"] = x

    logits = tf.identity(x, name="logits")
    endpoints["logits"] = logits
    return logits, endpoints


def count_trainable_params(graph=None):
    """Sum of the static sizes of the graph's TRAINABLE_VARIABLES."""
    graph = graph or tf.compat.v1.get_default_graph()
    total = 0
    for v in graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES):
        n = 1
        for d in v.shape.as_list():
            n *= int(d)
        total += n
    return total
