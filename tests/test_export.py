"""Export: the frozen graph and the SavedModel give the checkpoint's logits, with converter-friendly ops only.

A two-block EfficientNet at 32x32 with a checkpoint whose /ExponentialMovingAverage shadows differ from its raw
weights, so every parity check also proves which weights were exported.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_py
from effnet_exp.data.config import Normalization
from effnet_exp.data.preprocessing import normalize, preprocess_for_eval
from effnet_exp.errors import UserError
from effnet_exp.export.config import ExportConfig, ExportFormat, check_export
from effnet_exp.export.exporter import ALLOWED_OPS_FILE, export_model, summary_text
from effnet_exp.model.config import ModelConfig
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.restore import WeightsPlan, model_variables
from factory import section

SIZE = 32
CLASSES = 5
NORM = Normalization.imagenet
TOL = 1e-5
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def tiny_model(num_classes=CLASSES):
    return ModelConfig(name="efficientnet-b0", num_classes=num_classes, image_size=SIZE, head_filters=64,
                       blocks=["r1_k3_s11_e1_i32_o16_se0.25", "r2_k3_s22_e6_i16_o24_se0.25"])


def save_checkpoint(folder, cfg, seed=0):
    """Random weights and batch-norm statistics, plus EMA shadows that differ from them."""
    rng = np.random.RandomState(seed)
    with tf.Graph().as_default():
        build_efficientnet(tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3]), cfg, is_training=False)
        variables = model_variables(cfg.name)
        shadows = [tf.compat.v1.get_variable(v.op.name + "/ExponentialMovingAverage", v.shape, tf.float32,
                                             use_resource=True) for v in variables]
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for var, shadow in zip(variables, shadows):
                shape = var.shape.as_list()
                if var.op.name.endswith("moving_variance"):
                    raw = rng.uniform(0.5, 1.5, shape)
                elif var.op.name.endswith(("moving_mean", "beta", "bias")):
                    raw = rng.normal(0, 0.1, shape)
                elif var.op.name.endswith("gamma"):
                    raw = rng.uniform(0.8, 1.2, shape)
                else:
                    raw = sess.run(var)
                ema = raw * rng.uniform(0.9, 1.1, shape) if not var.op.name.endswith("moving_variance") else raw
                var.load(raw.astype(np.float32), sess)
                shadow.load(ema.astype(np.float32), sess)
            return tf.compat.v1.train.Saver().save(sess, os.path.join(folder, "model.ckpt"))


def checkpoint_logits(prefix, cfg, images, weights="ema"):
    """The reference: the training code's inference graph (tf.nn.swish) restored from the checkpoint."""
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3])
        logits, _ = build_efficientnet(x, cfg, is_training=False)
        saver = WeightsPlan(prefix, model_variables(cfg.name), cfg.name, weights).saver()
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, prefix)
            return sess.run(logits, {x: images})


def load_graph_def(path):
    graph_def = tf.compat.v1.GraphDef()
    with open(path, "rb") as f:
        graph_def.ParseFromString(f.read())
    return graph_def


def run_pb(path, feeds, fetches=("logits:0", "probabilities:0")):
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(load_graph_def(path), name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run(list(fetches), feeds)


def encode(array, fmt):
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        op = tf.image.encode_png(array) if fmt == "png" else tf.image.encode_jpeg(array, quality=95)
        return sess.run(op)


def random_images(n, seed=1):
    return np.random.RandomState(seed).normal(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    cfg = tiny_model()
    prefix = save_checkpoint(str(base), cfg)
    runs = {}
    for name, export_cfg in (
            ("all", ExportConfig(format="all", image_bytes_graph=True)),
            ("fixed", ExportConfig(format="frozen_pb", batch_size=2)),
            ("raw", ExportConfig(format="frozen_pb", use_ema=False, normalize_in_graph=True))):
        run_dir = base / name
        run_dir.mkdir()
        manifest = export_model(prefix, cfg, SIZE, NORM, str(run_dir), export_cfg, class_names=NAMES)
        runs[name] = (run_dir / "export", manifest)
    return {"cfg": cfg, "prefix": prefix, "runs": runs, "base": base}


def test_frozen_graph_gives_the_checkpoints_ema_logits(setup):
    export_dir, manifest = setup["runs"]["all"]
    assert manifest["weights"] == "ema"
    for n in (1, 3):  # the batch dimension is dynamic
        images = random_images(n, seed=n)
        expected = checkpoint_logits(setup["prefix"], setup["cfg"], images)
        logits, probabilities = run_pb(str(export_dir / "model.pb"), {"input:0": images})
        assert logits.shape == (n, CLASSES)
        assert np.max(np.abs(logits - expected)) < TOL
        softmax = np.exp(expected - expected.max(1, keepdims=True))
        assert np.allclose(probabilities, softmax / softmax.sum(1, keepdims=True), atol=1e-6)
    raw = checkpoint_logits(setup["prefix"], setup["cfg"], images, weights="raw")
    assert np.max(np.abs(logits - raw)) > 1e-3  # the EMA shadows were exported, not the raw weights


def test_raw_weights_and_normalisation_in_the_graph(setup):
    export_dir, manifest = setup["runs"]["raw"]
    assert manifest["weights"] == "raw" and manifest["normalization"]["in_graph"]
    pixels = np.random.RandomState(5).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    mean, std = np.array(manifest["normalization"]["mean"]), np.array(manifest["normalization"]["std"])
    expected = checkpoint_logits(setup["prefix"], setup["cfg"], ((pixels - mean) / std).astype(np.float32), "raw")
    logits, _ = run_pb(str(export_dir / "model.pb"), {"input:0": pixels})
    assert np.max(np.abs(logits - expected)) < TOL


def test_saved_model_gives_the_checkpoints_logits(setup):
    export_dir, _ = setup["runs"]["all"]
    images = random_images(3)
    expected = checkpoint_logits(setup["prefix"], setup["cfg"], images)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(export_dir / "saved_model"))
        signature = meta.signature_def["serving_default"]
        assert sorted(signature.inputs) == ["input"]
        assert sorted(signature.outputs) == ["logits", "probabilities"]
        logits = sess.run(signature.outputs["logits"].name, {signature.inputs["input"].name: images})
        assert "image_bytes" in meta.signature_def
    assert np.max(np.abs(logits - expected)) < TOL


def test_fixed_batch_rejects_other_sizes(setup):
    export_dir, manifest = setup["runs"]["fixed"]
    assert manifest["inputs"][0]["shape"] == [2, SIZE, SIZE, 3]
    assert not os.path.exists(str(export_dir / "saved_model"))
    images = random_images(2)
    logits, _ = run_pb(str(export_dir / "model.pb"), {"input:0": images})
    assert np.max(np.abs(logits - checkpoint_logits(setup["prefix"], setup["cfg"], images))) < TOL
    with pytest.raises(ValueError):
        run_pb(str(export_dir / "model.pb"), {"input:0": random_images(3)})
    assert '--input_shape="input:2,32,32,3"' in manifest["atc"][0]["command"]


FRESH_PROCESS = r"""
import sys
import numpy as np
import tensorflow as tf
pb, inputs, out = sys.argv[1:4]
graph_def = tf.compat.v1.GraphDef()
with open(pb, "rb") as f:
    graph_def.ParseFromString(f.read())
with tf.Graph().as_default() as graph:
    tf.compat.v1.import_graph_def(graph_def, name="")
with tf.compat.v1.Session(graph=graph) as sess:
    np.save(out, sess.run("logits:0", {"input:0": np.load(inputs)}))
extra = sorted(m for m in sys.modules if m.split(".")[0] in ("effnet_exp", "hydra", "omegaconf"))
assert not extra, extra
"""


def test_frozen_graph_loads_in_a_fresh_process_with_only_tensorflow(setup, tmp_path):
    export_dir, _ = setup["runs"]["all"]
    images = random_images(3, seed=7)
    np.save(str(tmp_path / "in.npy"), images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(export_dir / "model.pb"),
                           str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
                          cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = np.load(str(tmp_path / "out.npy"))
    assert np.max(np.abs(logits - checkpoint_logits(setup["prefix"], setup["cfg"], images))) < TOL


def graph_op_types(graph_def):
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return types


def is_forbidden(op_type):
    return (op_type in ("VarHandleOp", "ReadVariableOp", "VariableV2", "Variable", "AssignVariableOp",
                        "PyFunc", "PyFuncStateless", "EagerPyFunc", "RandomUniform", "RandomStandardNormal")
            or op_type.startswith(("Iterator", "AnonymousIterator", "MakeIterator"))
            or "dropout" in op_type.lower())


def test_frozen_graph_uses_only_allowed_ops(setup):
    with open(ALLOWED_OPS_FILE) as f:
        allowed = {line.split("#")[0].strip() for line in f} - {""}
    for name in ("all", "fixed", "raw"):
        export_dir, manifest = setup["runs"][name]
        graph_def = load_graph_def(str(export_dir / "model.pb"))
        types = graph_op_types(graph_def)
        print("{} model.pb op types: {}".format(name, ", ".join(sorted(types))))
        new = sorted(types - allowed)
        assert not new, "op types not in {}: {}".format(ALLOWED_OPS_FILE, ", ".join(new))
        assert not [t for t in types if is_forbidden(t)]
        assert len(graph_def.library.function) == 0  # no function calls (TF 1.15's swish is one)
        assert not [n.name for n in graph_def.node if "dropout" in n.name or "drop_connect" in n.name]
        assert sorted(manifest["files"]["frozen_pb"]["op_types"]) == sorted(types)
    bytes_types = graph_op_types(load_graph_def(str(setup["runs"]["all"][0] / "model_image_bytes.pb")))
    assert not [t for t in bytes_types if is_forbidden(t)]


def test_image_bytes_graph_equals_eval_preprocessing_then_float_graph(setup):
    export_dir, _ = setup["runs"]["all"]
    rng = np.random.RandomState(3)
    data = [encode(rng.randint(0, 255, (40, 56, 3)).astype(np.uint8), "jpeg"),
            encode(rng.randint(0, 255, (33, 33, 3)).astype(np.uint8), "png"),
            encode(rng.randint(0, 255, (70, 45, 3)).astype(np.uint8), "jpeg")]
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        one = tf.compat.v1.placeholder(tf.string, [])
        preprocessed = normalize(preprocess_for_eval(one, SIZE), NORM)
        images = np.stack([sess.run(preprocessed, {one: d}) for d in data])
    expected, _ = run_pb(str(export_dir / "model.pb"), {"input:0": images})
    logits, _ = run_pb(str(export_dir / "model_image_bytes.pb"), {"image_bytes:0": np.array(data, dtype=object)})
    assert np.max(np.abs(logits - expected)) < TOL
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        signature = tf.compat.v1.saved_model.loader.load(
            sess, ["serve"], str(export_dir / "saved_model")).signature_def["image_bytes"]
        served = sess.run(signature.outputs["logits"].name,
                          {signature.inputs["image_bytes"].name: np.array(data, dtype=object)})
    assert np.max(np.abs(served - expected)) < TOL


def test_export_json_names_shapes_and_atc_commands(setup, capsys):
    export_dir, manifest = setup["runs"]["all"]
    with open(str(export_dir / "export.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(manifest))
    assert saved["inputs"] == [{"name": "input", "tensor": "input:0", "dtype": "float32",
                                "shape": [-1, SIZE, SIZE, 3]}]
    assert [(o["name"], o["tensor"], o["dtype"], o["shape"]) for o in saved["outputs"]] == [
        ("logits", "logits:0", "float32", [-1, CLASSES]), ("probabilities", "probabilities:0", "float32", [-1, CLASSES])]
    assert saved["files"]["image_bytes_pb"]["inputs"][0]["dtype"] == "string"
    assert saved["normalization"]["name"] == NORM and saved["normalization"]["std"][0] == pytest.approx(58.395)
    assert saved["class_names"] == NAMES
    assert saved["batch_size"] is None
    commands = {entry["soc_version"]: entry["command"] for entry in saved["atc"]}
    assert commands == {
        soc: 'atc --model=model.pb --framework=3 --input_shape="input:1,32,32,3" '
             '--out_nodes="logits:0;probabilities:0" --soc_version={} --output={}'.format(soc, out)
        for soc, out in (("Ascend310", "model_310"), ("Ascend910", "model_910"))}
    assert all("dynamic" in entry["note"] for entry in saved["atc"])
    print(summary_text(saved))
    printed = capsys.readouterr().out
    assert commands["Ascend310"] in printed and commands["Ascend910"] in printed
    assert sorted(os.listdir(str(export_dir.parent))) == ["export"]  # no temporary folder left behind


def test_bad_settings_and_unfit_checkpoints_are_user_errors(setup, tmp_path):
    assert section("export", "export.format=all").format is ExportFormat.all
    with pytest.raises(Exception) as err:  # the schema's Enum: Hydra names the key, the value and the choices
        section("export", "export.format=onnx")
    message = str(err.value) + str(err.value.__cause__)
    assert "export.format" in message and "onnx" in message and "frozen_pb, saved_model, tflite, all" in message
    for bad, key in ((ExportConfig(batch_size=0), "export.batch_size=0"),
                     (ExportConfig(soc_versions=["Ascend 310"]), "export.soc_versions")):
        with pytest.raises(UserError) as err:
            check_export(bad)
        assert key in str(err.value)
    with pytest.raises(UserError) as err:  # the checkpoint has 5 classes
        export_model(setup["prefix"], tiny_model(num_classes=7), SIZE, NORM, str(tmp_path), ExportConfig())
    assert "head/dense" in str(err.value) and setup["prefix"] in str(err.value)
    assert os.listdir(str(tmp_path)) == []  # nothing half-written
    with pytest.raises(UserError) as err:
        export_model(setup["prefix"], setup["cfg"], SIZE, "zscore", str(tmp_path), ExportConfig())
    assert "zscore" in str(err.value)


def test_export_again_replaces_the_folder_whole(setup, tmp_path):
    export_model(setup["prefix"], setup["cfg"], SIZE, NORM, str(tmp_path), ExportConfig(format="saved_model"))
    (tmp_path / "export" / "stale.txt").write_text(u"old")
    export_model(setup["prefix"], setup["cfg"], SIZE, NORM, str(tmp_path), ExportConfig(batch_size=1))
    assert sorted(os.listdir(str(tmp_path / "export"))) == ["export.json", "model.pb"]
    assert os.listdir(str(tmp_path)) == ["export"]


def test_run_py_mode_export(setup, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    blocks = "[" + ",".join(tiny_model().blocks) + "]"
    proc = run_py(["mode=export", "eval.checkpoint=" + setup["prefix"], "model=efficientnet_b0",
                   "model.blocks=" + blocks, "model.head_filters=64", "model.image_size=32",
                   "dataset.normalization=imagenet", "export.format=all", "export.batch_size=1",
                   "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(str(run_dir / "export"))) == ["export.json", "model.pb", "model.tflite", "saved_model"]
    with open(str(run_dir / "export" / "export.json")) as f:
        manifest = json.load(f)
    assert manifest["num_classes"] == CLASSES and manifest["weights"] == "ema"
    assert manifest["inputs"][0]["shape"] == [1, SIZE, SIZE, 3]
    for entry in manifest["atc"]:
        assert entry["command"] in proc.stdout
    images = random_images(1)
    logits, _ = run_pb(str(run_dir / "export" / "model.pb"), {"input:0": images})
    assert np.max(np.abs(logits - checkpoint_logits(setup["prefix"], setup["cfg"], images))) < TOL

    bad = run_py(["mode=export", "eval.checkpoint=" + setup["prefix"], "export.format=onnx",
                  "hydra.run.dir=" + str(tmp_path / "bad")], tmp_path, cache_dir)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "export.format" in bad.stderr and "'onnx'" in bad.stderr and "frozen_pb, saved_model, tflite, all" in bad.stderr
