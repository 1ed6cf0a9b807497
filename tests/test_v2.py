"""EfficientNetV2 (B0-B3, S, M, L): the fused-MBConv block string, the authors' variable names, parameter counts
equal to keras.applications' and, on TF 2.x, Keras's logits from the same weights on real photographs."""
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import run_py, metrics, only
from effnet_exp import optional
from effnet_exp.data.config import Normalization
from effnet_exp.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalization_constants, normalize
from effnet_exp.export.config import ExportConfig
from effnet_exp.export.exporter import export_model, run_frozen
from effnet_exp.inference.predictor import Predictor
from effnet_exp.model.blocks import (BlockArgs, decode_block_string, encode_block_string, is_fused,
                                     round_filters)
from effnet_exp.model.config import input_size
from effnet_exp.model.efficientnet import build_efficientnet, count_trainable_params, expand_block_args
from effnet_exp.model.pretrained.importer import load_model_config
from effnet_exp.model.restore import InferenceModel
from effnet_exp.run_folder import resolve_checkpoint
from factory import section

# Trainable parameters of keras.applications.EfficientNetV2<X>(weights=None, classes=1000), measured with Keras
# (the figures).
KERAS_TRAINABLE = {"b0": 7139704, "b1": 8141052, "b2": 10096086, "b3": 14358406, "s": 21458488}
KERAS_BUILDERS = {"b0": "EfficientNetV2B0", "b1": "EfficientNetV2B1", "b2": "EfficientNetV2B2",
                  "b3": "EfficientNetV2B3", "s": "EfficientNetV2S"}
# google/automl efficientnetv2/effnetv2_configs.py: (width, depth, train size, eval size, dropout).
AUTHORS = {"b0": (1.0, 1.0, 192, 224, 0.2), "b1": (1.0, 1.1, 192, 240, 0.2), "b2": (1.1, 1.2, 208, 260, 0.3),
           "b3": (1.2, 1.4, 240, 300, 0.3), "s": (1.0, 1.0, 300, 384, 0.2), "m": (1.0, 1.0, 384, 480, 0.3),
           "l": (1.0, 1.0, 384, 480, 0.4)}
GV = tf.compat.v1.GraphKeys


def compose(variant, num_classes=1000, *extra):
    return section("model", "model=efficientnetv2_%s" % variant, "dataset.num_classes=%d" % num_classes, *extra)


def test_fused_block_string_is_one_more_kind_in_the_codec():
    fused = decode_block_string("r2_k3_s22_e4_i16_o32_c1")
    assert fused == BlockArgs(num_repeat=2, kernel_size=3, strides=(2, 2), expand_ratio=4, input_filters=16,
                              output_filters=32, se_ratio=None, id_skip=True, conv_type=1)
    assert is_fused(fused) and encode_block_string(fused) == "r2_k3_s22_e4_i16_o32_c1"
    v1 = decode_block_string("r1_k3_s11_e1_i32_o16_se0.25")
    assert v1.conv_type == 0 and not is_fused(v1)
    assert encode_block_string(v1) == "r1_k3_s11_e1_i32_o16_se0.25"  # V1 strings unchanged
    assert decode_block_string("r1_k3_s11_e1_i32_o16_c0") == v1._replace(se_ratio=None)
    for bad in ("r1_k3_s11_e1_i32_o16_c2", "r1_k3_s11_e1_i32_o16_c1_c1", "r1_k3_s11_e1_i32_o16_cx"):
        with pytest.raises(ValueError) as err:
            decode_block_string(bad)
        assert bad in str(err.value)


def test_v2_rounding_has_no_ninety_percent_rule():
    # 16 x 1.2 = 19.2 rounds to 16 (Keras's and the authors' formula: int(19.2 + 4) // 8 * 8); V1 adds 8 because
    # 16 < 0.9 x 19.2.
    assert round_filters(16, 1.2, 8, None, min_ratio=0.0) == 16
    assert round_filters(16, 1.2, 8, None) == 24
    cfg = compose("b3")
    assert [b.output_filters for b in expand_block_args(cfg)][:1] == [16]


@pytest.mark.parametrize("variant", sorted(AUTHORS))
def test_configs_are_the_authors(variant):
    width, depth, train_size, eval_size, dropout = AUTHORS[variant]
    cfg = compose(variant)
    assert cfg.name == "efficientnetv2-" + variant
    assert (cfg.width_coefficient, cfg.depth_coefficient, cfg.train_resolution, cfg.resolution,
            cfg.dropout_rate) == (width, depth, train_size, eval_size, dropout)
    assert (cfg.batch_norm_momentum, cfg.batch_norm_epsilon, cfg.activation, cfg.survival_prob) == (
        0.9, 1e-3, "swish", 0.8)
    assert input_size(cfg) == eval_size
    blocks = expand_block_args(cfg)
    kinds = [is_fused(b) for b in blocks]
    # Fused stages first, then MBConv stages with squeeze-excitation 0.25 of the block's input filters.
    first_mb = kinds.index(False)
    assert all(kinds[:first_mb]) and not any(kinds[first_mb:])
    assert all(b.se_ratio is None for b in blocks[:first_mb])
    assert all(b.se_ratio == 0.25 for b in blocks[first_mb:])
    assert cfg.normalization == (None if variant.startswith("b") else Normalization.signed)


@pytest.mark.parametrize("variant", sorted(KERAS_TRAINABLE))
def test_trainable_params_equal_keras(variant):
    cfg = compose(variant)
    with tf.Graph().as_default() as g:
        logits, _ = build_efficientnet(tf.compat.v1.placeholder(tf.float32, [1, 32, 32, 3]), cfg, False)
        assert logits.shape.as_list() == [1, 1000]
        ours = count_trainable_params(g)
    assert ours == KERAS_TRAINABLE[variant]
    keras = optional.keras()
    if keras is not None:
        model = getattr(keras.applications, KERAS_BUILDERS[variant])(weights=None, include_preprocessing=False)
        assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == ours


def test_b0_variable_names_follow_the_authors_code():
    """Names as google/automl effnetv2_model.py creates them: per block, conv2d / conv2d_1 and
    tpu_batch_normalization(_1, _2) in order of creation; shapes worked out by hand from the block strings."""
    cfg = compose("b0")
    with tf.Graph().as_default() as g:
        build_efficientnet(tf.compat.v1.placeholder(tf.float32, [None, 64, 64, 3]), cfg, is_training=True)
        shapes = {v.op.name: v.shape.as_list() for v in g.get_collection(GV.GLOBAL_VARIABLES)}
    p = "efficientnetv2-b0/"
    expected = {
        "stem/conv2d/kernel": [3, 3, 3, 32],
        "stem/tpu_batch_normalization/moving_mean": [32],
        # blocks_0: fused, expansion 1 -> one 3x3 conv (the projection), its batch norm.
        "blocks_0/conv2d/kernel": [3, 3, 32, 16],
        "blocks_0/tpu_batch_normalization/gamma": [16],
        # blocks_1: fused, expansion 4 -> 3x3 expand conv (stride 2), 1x1 project conv.
        "blocks_1/conv2d/kernel": [3, 3, 16, 64],
        "blocks_1/tpu_batch_normalization/beta": [64],
        "blocks_1/conv2d_1/kernel": [1, 1, 64, 32],
        "blocks_1/tpu_batch_normalization_1/moving_variance": [32],
        # blocks_5: the first MBConv block (48 -> 96, expansion 4, SE 0.25 x 48 = 12).
        "blocks_5/conv2d/kernel": [1, 1, 48, 192],
        "blocks_5/depthwise_conv2d/depthwise_kernel": [3, 3, 192, 1],
        "blocks_5/se/conv2d/kernel": [1, 1, 192, 12],
        "blocks_5/se/conv2d_1/bias": [192],
        "blocks_5/conv2d_1/kernel": [1, 1, 192, 96],
        "blocks_5/tpu_batch_normalization_2/gamma": [96],
        "blocks_20/conv2d_1/kernel": [1, 1, 1152, 192],
        "head/conv2d/kernel": [1, 1, 192, 1280],
        "head/tpu_batch_normalization/gamma": [1280],
        "head/dense/kernel": [1280, 1000],
        "head/dense/bias": [1000],
    }
    for name, shape in expected.items():
        assert shapes.get(p + name) == shape, name
    assert p + "blocks_21/conv2d/kernel" not in shapes
    assert not any(re.search(r"blocks_[0-4]/(depthwise|se)", n) for n in shapes)
    assert all(n.startswith(p) for n in shapes)


# --------------------------------------------------------------------------
# Keras's EfficientNetV2B0 as the witness (TF 2.x with Keras 3)
# --------------------------------------------------------------------------


def keras_name_map(model, scope):
    """{our variable name: Keras weight} for a keras.applications EfficientNetV2: stem_* -> stem/, top_* and
    predictions -> head/, block<s><r>_* -> blocks_<global index>/, each block's convolutions and batch norms named
    in their order of creation (conv2d, conv2d_1; tpu_batch_normalization, _1, _2) as in the authors' code."""
    fixed = {"stem_conv": "stem/conv2d", "stem_bn": "stem/tpu_batch_normalization", "top_conv": "head/conv2d",
             "top_bn": "head/tpu_batch_normalization", "predictions": "head/dense"}
    blocks = []
    for layer in model.layers:
        m = re.match(r"(block\d+[a-z])_(.*)$", layer.name)
        if m and m.group(1) not in blocks:
            blocks.append(m.group(1))
    parts = {}
    for layer in model.layers:
        m = re.match(r"(block\d+[a-z])_(.*)$", layer.name)
        if m and layer.weights:
            parts.setdefault(m.group(1), []).append((m.group(2), layer))
    mapping = {}
    for layer in model.layers:
        if layer.name in fixed:
            for w in layer.weights:
                mapping["%s/%s/%s" % (scope, fixed[layer.name], w.name)] = w
    for block, items in parts.items():
        convs = [n for n in ("expand_conv", "project_conv") if n in dict(items)]
        bns = [n for n in ("expand_bn", "bn", "project_bn") if n in dict(items)]
        names = {"dwconv2": "depthwise_conv2d", "se_reduce": "se/conv2d", "se_expand": "se/conv2d_1"}
        names.update({n: "conv2d" + ("_%d" % i if i else "") for i, n in enumerate(convs)})
        names.update({n: "tpu_batch_normalization" + ("_%d" % i if i else "") for i, n in enumerate(bns)})
        for part, layer in items:
            for w in layer.weights:
                leaf = "depthwise_kernel" if part == "dwconv2" else w.name
                mapping["%s/blocks_%d/%s/%s" % (scope, blocks.index(block), names[part], leaf)] = w
    return mapping


def sample_image(name):
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def photographs(size):
    """scikit-learn's two sample photographs, resized to size x size and normalised with ImageNet's mean/std."""
    images = [np.asarray(Image.fromarray(sample_image(name)).resize((size, size), Image.BILINEAR))
              for name in ("china.jpg", "flower.jpg")]
    x = np.stack(images).astype(np.float32)
    return (x - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)


@pytest.mark.skipif(optional.keras() is None, reason="Keras 3 (TF 2.x stack) is the witness")
def test_keras_weights_give_keras_logits_on_photographs():
    keras = optional.keras()
    size = 96
    model = keras.applications.EfficientNetV2B0(weights=None, include_preprocessing=False,
                                                classifier_activation=None, input_shape=(size, size, 3))
    # Every weight drawn here from one seed (Keras's own initialisation is not seeded, and some of its draws with
    # these batch-norm statistics gave logits in the hundreds, where float32's rounding alone exceeds 1e-4):
    # kernels with variance 1/fan-in keep the activations, and so the logits, of order 1.
    rng = np.random.RandomState(0)
    for w in model.weights:  # batch norm with non-trivial statistics and affine terms, a non-zero bias
        name, shape = w.name, tuple(w.shape)
        if name == "moving_variance":
            w.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif name in ("moving_mean", "beta", "bias"):
            w.assign(rng.normal(0, 0.1, shape).astype(np.float32))
        elif name == "gamma":
            w.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        else:
            assert name in ("kernel", "depthwise_kernel"), name
            fan_in = int(np.prod(shape[:2])) if name == "depthwise_kernel" else int(np.prod(shape[:-1]))
            w.assign((rng.normal(0, 1, shape) / np.sqrt(fan_in)).astype(np.float32))
    images = photographs(size)
    expected = np.asarray(model(images, training=False))

    cfg = compose("b0")
    values = {name: np.asarray(w.numpy()) for name, w in keras_name_map(model, cfg.name).items()}
    with tf.Graph().as_default() as g:
        x = tf.compat.v1.placeholder(tf.float32, [None, size, size, 3])
        logits, _ = build_efficientnet(x, cfg, is_training=False)
        variables = {v.op.name: v for v in g.get_collection(GV.GLOBAL_VARIABLES)}
        assert sorted(variables) == sorted(values)
        with tf.compat.v1.Session() as sess:
            for name, var in variables.items():
                var.load(values[name], sess)
            got = sess.run(logits, {x: images})
    assert expected.std() > 0.05  # logits that tell classes apart, so the comparison means something
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert list(got.argmax(1)) == list(expected.argmax(1))


# --------------------------------------------------------------------------
# Everything V1 does: train, evaluate, export, predict
# --------------------------------------------------------------------------


def test_run_py_trains_and_evaluates_v2_b0_then_export_and_predict(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(["model=efficientnetv2_b0", "model.image_size=64", "train.batch_size=8", "train.steps=4",
                   "train.log_every=2", "train.checkpoint_every=2", "eval.batch_size=128",
                   "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"eval top1 \d", proc.stdout), proc.stdout[-2000:]
    assert [m["step"] for m in metrics(str(run_dir)) if "loss" in m][-1] == 4
    only(str(run_dir / "eval.json"))

    cfg = load_model_config("efficientnetv2_b0", num_classes=10)
    cfg.image_size = 64
    prefix = resolve_checkpoint(str(run_dir))
    (tmp_path / "exp").mkdir()
    manifest = export_model(prefix, cfg, 64, Normalization.imagenet, str(tmp_path / "exp"),
                            ExportConfig(format="all", batch_size=1))
    assert manifest["num_classes"] == 10
    images = np.random.RandomState(0).normal(0, 1, (1, 64, 64, 3)).astype(np.float32)
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 64, 64, 3])
        model = InferenceModel(x, cfg, prefix)
        with tf.compat.v1.Session() as sess:
            model.restore(sess)
            want = sess.run(model.logits, {x: images})
    graph_def = tf.compat.v1.GraphDef()
    with open(str(tmp_path / "exp" / "export" / "model.pb"), "rb") as f:
        graph_def.ParseFromString(f.read())
    got = run_frozen(graph_def, {"input": images}, ("logits",))[0]
    assert np.max(np.abs(got - want)) < 1e-4

    photo = tmp_path / "china.jpg"
    Image.fromarray(sample_image("china.jpg")).save(str(photo))
    results = Predictor(cfg, 64, Normalization.imagenet, 0, None, None).predict(prefix, [str(photo)], top_k=3)
    top = results[0]["top5"]
    assert len(results) == 1 and len(top) == 3 and all(0 <= t["index"] < 10 for t in top)
    assert 0 < sum(t["probability"] for t in top) <= 1 + 1e-5


def test_signed_normalization_is_keras_v2_s_rescaling():
    # keras.applications.EfficientNetV2S's preprocessing: Rescaling(scale=1/128, offset=-1).
    pixels = np.array([[[[0.0, 128.0, 255.0]]]], np.float32)
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        got = sess.run(normalize(tf.constant(pixels), Normalization.signed))
    np.testing.assert_allclose(got, pixels / 128.0 - 1.0, atol=1e-7)
    assert normalization_constants("signed") == ((128.0,) * 3, (128.0,) * 3)
