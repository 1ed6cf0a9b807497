"""Small graph-mode building blocks (tf.compat.v1 only; no Keras, no tf.layers).

Every helper opens its own ``tf.compat.v1.variable_scope(name)`` and creates its
variables there with ``use_resource=True``, so the variable names are
``<enclosing scope>/<name>/<kernel|bias|gamma|...>``. All convolutions are
channels-last (NHWC) with 'SAME' padding.
"""
import math

import tensorflow as tf

from effnet_exp.model.config import Activation

__all__ = [
    "conv_kernel_initializer",
    "dense_kernel_initializer",
    "conv2d",
    "depthwise_conv2d",
    "batch_norm",
    "dense",
    "get_activation",
    "drop_connect",
]

_GLOBAL = tf.compat.v1.GraphKeys.GLOBAL_VARIABLES
_MOVING_AVG = tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES
_UPDATE_OPS = tf.compat.v1.GraphKeys.UPDATE_OPS
_TF1 = tf.__version__.startswith("1.")


def conv_kernel_initializer(shape):
    """N(0, sqrt(2 / fan_out)) with fan_out = kh * kw * shape[-1] (as the reference).

    For a depthwise kernel [k, k, C, 1] this gives fan_out = k * k.
    """
    kh, kw, _, out_filters = [int(d) for d in shape]
    fan_out = kh * kw * out_filters
    return tf.compat.v1.random_normal_initializer(
        mean=0.0, stddev=math.sqrt(2.0 / fan_out)
    )


def dense_kernel_initializer(shape):
    """U(-1/sqrt(units), 1/sqrt(units)) for a [in, units] kernel (as the reference)."""
    init_range = 1.0 / math.sqrt(int(shape[1]))
    return tf.compat.v1.random_uniform_initializer(-init_range, init_range)


def _strides4(strides):
    if isinstance(strides, int):
        strides = (strides, strides)
    strides = tuple(int(s) for s in strides)
    if len(strides) != 2:
        raise ValueError("strides must be an int or a pair, got %r" % (strides,))
    return [1, strides[0], strides[1], 1]


def _kernel_hw(kernel_size):
    if isinstance(kernel_size, int):
        return kernel_size, kernel_size
    kh, kw = kernel_size
    return int(kh), int(kw)


def _channels(x):
    c = x.shape[-1]
    c = getattr(c, "value", c)  # TF1 Dimension vs TF2 int
    if c is None:
        raise ValueError("Input %s needs a static channel dimension" % x.name)
    return int(c)


def conv2d(x, filters, kernel_size=1, strides=1, use_bias=False, name="conv2d"):
    """2-D convolution; variables ``<name>/kernel`` [kh, kw, C, filters] (+ ``bias``)."""
    kh, kw = _kernel_hw(kernel_size)
    shape = [kh, kw, _channels(x), int(filters)]
    with tf.compat.v1.variable_scope(name, use_resource=True):
        kernel = tf.compat.v1.get_variable(
            "kernel",
            shape=shape,
            dtype=tf.float32,
            initializer=conv_kernel_initializer(shape),
            use_resource=True,
        )
        y = tf.nn.conv2d(x, kernel, _strides4(strides), "SAME")
        if use_bias:
            bias = tf.compat.v1.get_variable(
                "bias",
                shape=[int(filters)],
                dtype=tf.float32,
                initializer=tf.compat.v1.zeros_initializer(),
                use_resource=True,
            )
            y = tf.nn.bias_add(y, bias)
    return y


def depthwise_conv2d(x, kernel_size, strides=1, name="depthwise_conv2d"):
    """Depthwise conv (multiplier 1); variable ``<name>/depthwise_kernel`` [kh, kw, C, 1]."""
    kh, kw = _kernel_hw(kernel_size)
    shape = [kh, kw, _channels(x), 1]
    with tf.compat.v1.variable_scope(name, use_resource=True):
        kernel = tf.compat.v1.get_variable(
            "depthwise_kernel",
            shape=shape,
            dtype=tf.float32,
            initializer=conv_kernel_initializer(shape),
            use_resource=True,
        )
        y = tf.nn.depthwise_conv2d(x, kernel, _strides4(strides), "SAME")
    return y


def batch_norm(
    x,
    is_training,
    momentum=0.99,
    epsilon=1e-3,
    name="tpu_batch_normalization",
):
    """Fused batch norm over the channel (last) axis of an NHWC tensor.

    Variables: ``gamma`` and ``beta`` (trainable), ``moving_mean`` and
    ``moving_variance`` (non-trainable, in GLOBAL_VARIABLES and
    MOVING_AVERAGE_VARIABLES). In training mode the batch statistics normalise
    ``x`` and the two moving-average assign ops
    (``moving = moving - (moving - batch_stat) * (1 - momentum)``) are added to
    UPDATE_OPS; in inference mode the moving statistics are used.
    """
    is_training = _static_bool(is_training)
    channels = _channels(x)
    stat_collections = [_GLOBAL, _MOVING_AVG]
    with tf.compat.v1.variable_scope(name, use_resource=True):
        gamma = tf.compat.v1.get_variable(
            "gamma", [channels], tf.float32,
            initializer=tf.compat.v1.ones_initializer(), use_resource=True,
        )
        beta = tf.compat.v1.get_variable(
            "beta", [channels], tf.float32,
            initializer=tf.compat.v1.zeros_initializer(), use_resource=True,
        )
        # Under a tf.distribute strategy each replica normalises with its own batch statistics and the moving
        # averages take the mean of the replicas' updates (ignored without a strategy).
        moving_mean = tf.compat.v1.get_variable(
            "moving_mean", [channels], tf.float32,
            initializer=tf.compat.v1.zeros_initializer(),
            trainable=False, collections=stat_collections, use_resource=True,
            aggregation=tf.VariableAggregation.MEAN,
        )
        moving_variance = tf.compat.v1.get_variable(
            "moving_variance", [channels], tf.float32,
            initializer=tf.compat.v1.ones_initializer(),
            trainable=False, collections=stat_collections, use_resource=True,
            aggregation=tf.VariableAggregation.MEAN,
        )
        if is_training:
            y, batch_mean, batch_variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=epsilon, data_format="NHWC",
                is_training=True,
            )
            decay = 1.0 - float(momentum)
            with tf.compat.v1.name_scope("moving_average_update"):
                # A non-finite batch (a NaN step that the trainer skips) must not poison the statistics.
                update_mean = moving_mean.assign_sub(
                    _finite_or_zero((moving_mean.read_value() - batch_mean) * decay),
                    read_value=False,
                )
                update_variance = moving_variance.assign_sub(
                    _finite_or_zero((moving_variance.read_value() - batch_variance) * decay),
                    read_value=False,
                )
            tf.compat.v1.add_to_collection(_UPDATE_OPS, update_mean)
            tf.compat.v1.add_to_collection(_UPDATE_OPS, update_variance)
        else:
            y = _folded_into_conv(x, gamma, beta, moving_mean, moving_variance, epsilon)
            if y is None:
                y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                    x, gamma, beta, mean=moving_mean, variance=moving_variance,
                    epsilon=epsilon, data_format="NHWC", is_training=False,
                )
    return y


def _folded_into_conv(x, gamma, beta, mean, variance, epsilon):
    """Inference batch norm right after a bias-free convolution, folded into it: the kernel scaled per output
    channel and one BiasAdd, which the CPU graph optimizer fuses with the convolution and its activation.
    Returns None when ``x`` is not such a convolution's output. The unfolded conv is left unused and pruned."""
    op = x.op
    if op.type not in ("Conv2D", "DepthwiseConv2dNative") or len(x.consumers()) != 0:
        return None
    inputs, kernel = op.inputs[0], op.inputs[1]
    scale = gamma * tf.math.rsqrt(variance + epsilon)
    offset = beta - mean * scale
    strides = op.get_attr("strides")
    if op.type == "Conv2D":
        y = tf.nn.conv2d(inputs, kernel * scale, strides, "SAME")
    else:
        y = tf.nn.depthwise_conv2d(inputs, kernel * tf.reshape(scale, [1, 1, -1, 1]), strides, "SAME")
    return tf.nn.bias_add(y, offset)


def _finite_or_zero(t):
    return tf.where(tf.math.is_finite(t), t, tf.zeros_like(t))


def dense(x, units, name="dense"):
    """Fully connected layer; variables ``<name>/kernel`` [in, units] and ``bias``."""
    shape = [_channels(x), int(units)]
    with tf.compat.v1.variable_scope(name, use_resource=True):
        kernel = tf.compat.v1.get_variable(
            "kernel", shape, tf.float32,
            initializer=dense_kernel_initializer(shape), use_resource=True,
        )
        bias = tf.compat.v1.get_variable(
            "bias", [int(units)], tf.float32,
            initializer=tf.compat.v1.zeros_initializer(), use_resource=True,
        )
        y = tf.nn.bias_add(tf.linalg.matmul(x, kernel), bias)
    return y


def swish_sigmoid(x):
    """swish spelled out as ``x * sigmoid(x)``: plain Sigmoid and Mul ops (for exported graphs), the same values
    as tf.nn.swish, which some TensorFlow versions build as an opaque function call."""
    return x * tf.sigmoid(x)


def swish_xla_grad(x):
    """tf.nn.swish whose gradient is compiled by XLA into one element-wise kernel.

    TensorFlow's own swish gradient is six element-wise passes over the activation (sigmoid, subtract,
    add and three multiplies): on CPU they were 16% of the op time of B0's training step. Only those ops are compiled
    (a jit_scope inside the gradient), not the convolutions around them. TF 1.15 gets tf.nn.swish: its XLA
    compiles these kernels for minutes and runs them slower than the separate ops."""
    if _TF1:
        return tf.nn.swish(x)

    @tf.custom_gradient
    def swish(features):
        def grad(dy):
            with tf.xla.experimental.jit_scope(separate_compiled_gradients=False):
                sigmoid = tf.sigmoid(features)
                return dy * (sigmoid * (1.0 + features * (1.0 - sigmoid)))
        return tf.nn.swish(features), grad

    return swish(x)


_ACTIVATIONS = {
    Activation.swish: tf.nn.swish,
    Activation.swish_sigmoid: swish_sigmoid,
    Activation.silu: tf.nn.swish,
    Activation.relu6: tf.nn.relu6,
    Activation.relu: tf.nn.relu,
}
_SWISH = (Activation.swish, Activation.silu)


def get_activation(name, is_training=True, xla_swish_grad=False):
    """Returns the activation function for ``name``, an Activation or its value (swish/silu, swish_sigmoid,
    relu6, relu).

    Inference graphs get swish as plain ``x * sigmoid(x)``: with oneDNN (TF 2.x on CPU) Grappler then fuses
    conv + bias + swish into one kernel (B0 eval +7% on 2 cores). Training keeps tf.nn.swish, whose own gradient
    is cheaper than the spelled-out one's (train -8%); with ``xla_swish_grad`` that gradient is one XLA kernel
    (`swish_xla_grad`)."""
    try:
        key = Activation(name)
    except ValueError:
        raise ValueError("Unknown activation %r; expected one of %s"
                         % (name, ", ".join(sorted(a.value for a in Activation))))
    if not is_training and key in _SWISH:
        return swish_sigmoid
    if xla_swish_grad and key in _SWISH:
        return swish_xla_grad
    return _ACTIVATIONS[key]


def drop_connect(x, is_training, survival_prob, name="drop_connect"):
    """Stochastic depth: drops whole samples of ``x`` (rank 4) in training.

    Returns ``x / p * floor(p + U[0, 1))`` with a [B, 1, 1, 1] mask, or ``x``
    unchanged in inference mode or when ``survival_prob`` is None/>= 1.
    """
    if not _static_bool(is_training) or survival_prob is None:
        return x
    survival_prob = float(survival_prob)
    if survival_prob >= 1.0:
        return x
    if survival_prob <= 0.0:
        raise ValueError("survival_prob must be in (0, 1], got %r" % survival_prob)
    with tf.compat.v1.name_scope(name):
        batch = tf.shape(x)[0]
        random_tensor = survival_prob + tf.random.uniform(
            tf.stack([batch, 1, 1, 1]), dtype=x.dtype
        )
        binary_mask = tf.floor(random_tensor)
        return x / survival_prob * binary_mask


def _static_bool(is_training):
    if isinstance(is_training, (tf.Tensor, tf.Variable)):
        raise TypeError(
            "is_training must be a Python bool (build separate train/eval graphs), "
            "got a tensor %r" % (is_training,)
        )
    return bool(is_training)
