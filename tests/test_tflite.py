"""TFLite export and exported artifacts: a briefly trained Lite0 on the digits at 32x32, exported once as model.pb,
saved_model/ and model.tflite / _fp16 / _int8 (module fixture); each artifact is checked against the checkpoint
through TensorFlow's own tf.lite.Interpreter and the training code's graph, and mode=eval on each must give the
checkpoint's eval.json top-1 exactly."""
import dataclasses
import os

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from conftest import read_json
from effnet_exp.data.pipeline import build_dataset
from effnet_exp.data.source import resolve_data_source
from effnet_exp.errors import UserError
from effnet_exp.experiment import prepare, run
from effnet_exp.export import tflite
from effnet_exp.export.config import Int8IO, Quantize, check_export
from effnet_exp.model.restore import InferenceModel
from effnet_exp.resume import save_config
from effnet_exp.run_folder import HYDRA_CONFIG, predictions_path
from effnet_exp.tools import export_report
from factory import run_config

SIZE = 32
TRAIN = ["model.image_size={}".format(SIZE), "train.batch_size=16", "train.steps=30", "train.log_every=10",
         "train.checkpoint_every=30", "eval.batch_size=128"]
EXPORT = ["mode=export", "export.format=all", "export.quantize=[none,fp16,int8]", "export.calibration_images=64",
          "export.report=true", "export.report_images=64", "export.report_runs=3"]


def in_process(overrides, run_dir):
    """run.py's work for these overrides, in this process; returns (its result, the RunSpec)."""
    cfg = run_config(*overrides)
    spec = prepare(cfg, str(run_dir))
    os.makedirs(str(run_dir / ".hydra"))  # what Hydra writes, and what the next run reads of this one
    OmegaConf.save(OmegaConf.structured(cfg), os.path.join(str(run_dir), HYDRA_CONFIG))
    save_config(OmegaConf.structured(cfg), str(run_dir))
    return run(spec), spec


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cache_dir):
    base = tmp_path_factory.mktemp("tflite")
    cache = ["dataset.cache_dir=" + cache_dir]
    in_process(TRAIN + cache + ["mode=train_eval"], base / "train")
    in_process(EXPORT + cache + ["eval.checkpoint=" + str(base / "train")], base / "export")
    return {"base": base, "cache": cache, "train": base / "train", "export": base / "export" / "export",
            "manifest": read_json(str(base / "export" / "export" / "export.json"))}


def eval_images(cache, count):
    """The first `count` images of the digits' eval split, through the input pipeline (lite normalisation)."""
    cfg = run_config(*cache)
    source = resolve_data_source(cfg.dataset, need_train=False, need_eval=True)
    with tf.Graph().as_default():
        dataset = build_dataset(source, cfg.dataset, is_training=False, batch_size=count, image_size=SIZE,
                                normalization="lite")
        images, _ = tf.compat.v1.data.make_one_shot_iterator(dataset).get_next()[:2]
        with tf.compat.v1.Session() as sess:
            return sess.run(images)


def checkpoint_probabilities(exported, images):
    """The reference: the training code's graph restored from the exported checkpoint."""
    prefix = exported["manifest"]["checkpoint"]
    model_cfg = dataclasses.replace(run_config(*TRAIN).model, num_classes=10)
    with tf.Graph().as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, SIZE, SIZE, 3])
        model = InferenceModel(x, model_cfg, prefix, use_ema=True)
        probabilities = tf.nn.softmax(model.logits)
        with tf.compat.v1.Session() as sess:
            model.restore(sess)
            return sess.run(probabilities, {x: images})


def interpreter_probabilities(path, images):
    """TensorFlow's own interpreter, one image at a time (the file's batch), float input and output."""
    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    feed = interpreter.get_input_details()[0]
    fetch = [d for d in interpreter.get_output_details() if d["name"].split(":")[0] == "probabilities"][0]
    out = []
    for image in images:
        interpreter.set_tensor(feed["index"], image[None].astype(np.float32))
        interpreter.invoke()
        out.append(interpreter.get_tensor(fetch["index"])[0])
    return np.array(out)


@pytest.fixture(scope="module")
def batch(exported):
    images = eval_images(exported["cache"], 32)
    return images, checkpoint_probabilities(exported, images)


@pytest.mark.parametrize("name,tolerance", [("model.tflite", 1e-5), ("model_fp16.tflite", 1e-2)])
def test_float_and_fp16_tflite_give_the_checkpoints_probabilities(exported, batch, name, tolerance):
    images, expected = batch
    got = interpreter_probabilities(exported["export"] / name, images)
    np.testing.assert_allclose(got, expected, atol=tolerance, rtol=0)


def test_int8_tflite_predicts_the_checkpoints_top1(exported, batch):
    images, expected = batch
    got = interpreter_probabilities(exported["export"] / "model_int8.tflite", images)
    agree = np.argmax(got, 1) == np.argmax(expected, 1)
    assert agree.mean() >= 0.6, agree.mean()
    # Where the checkpoint is decided (its top-1 leads by 0.1), int8 rarely changes the answer.
    ranked = np.sort(expected, 1)
    decided = ranked[:, -1] - ranked[:, -2] > 0.1
    assert decided.sum() >= 3 and agree[decided].mean() >= 0.8, (decided.sum(), agree[decided])


def test_export_json_describes_each_tflite_file(exported):
    entries = {e["path"]: e for e in exported["manifest"]["files"]["tflite"]}
    assert sorted(entries) == ["model.tflite", "model_fp16.tflite", "model_int8.tflite"]
    for name, entry in entries.items():
        data = (exported["export"] / name).read_bytes()
        assert entry["size_bytes"] == len(data)
        assert [t["name"] for t in entry["outputs"]] == ["logits", "probabilities"]
        assert entry["inputs"][0]["shape"] == [1, SIZE, SIZE, 3] and entry["inputs"][0]["dtype"] == "float32"
        assert {"CONV_2D", "DEPTHWISE_CONV_2D", "SOFTMAX"} <= set(entry["op_types"])
    assert entries["model.tflite"]["check"]["max_abs_diff_probabilities"] < 1e-5
    assert entries["model_int8.tflite"]["calibration_images"] == 64
    assert {"QUANTIZE", "DEQUANTIZE"} <= set(entries["model_int8.tflite"]["op_types"])
    assert "DEQUANTIZE" not in entries["model.tflite"]["op_types"]
    # fp16 stores the weights as float16, the float file as float32: about half the size.
    assert entries["model_fp16.tflite"]["size_bytes"] < 0.6 * entries["model.tflite"]["size_bytes"]


def test_op_names_match_tflites_own_schema(exported):
    schema = pytest.importorskip("tensorflow.lite.python.schema_py_generated")  # TF 2.x only
    names = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    for code, name in tflite.BUILTIN_OPS.items():
        assert names[code] == name
    for name in ("model.tflite", "model_int8.tflite"):
        data = (exported["export"] / name).read_bytes()
        model = schema.Model.GetRootAsModel(data, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        assert tflite.op_types(data) == sorted(set(names[max(c.DeprecatedBuiltinCode(), c.BuiltinCode())]
                                                   for c in codes))


def test_uint8_input_and_output(exported, batch):
    images, expected = batch
    data = tflite.convert(str(exported["export"] / "model.pb"), Quantize.int8, SIZE, None, "input",
                          ["logits", "probabilities"], calibration=images, int8_io=Int8IO.uint8)
    described = tflite.describe(data)
    feed = described["inputs"][0]
    assert feed["dtype"] == "uint8" and feed["quantization"]["scale"] > 0
    assert all(o["dtype"] == "uint8" for o in described["outputs"])
    # Lite's (x - 127) / 128 input is about 2 / 255 per uint8 step.
    assert abs(feed["quantization"]["scale"] * 255 - 2.0) < 0.1
    runner = tflite.TFLiteRunner(data)
    got = runner(images, "probabilities")
    assert np.mean(np.argmax(got, 1) == np.argmax(expected, 1)) >= 0.6


@pytest.mark.parametrize("artifact", ["model.pb", "saved_model", "model.tflite"])
def test_mode_eval_on_an_artifact_gives_the_checkpoints_top1(exported, artifact):
    reference = read_json(str(exported["train"] / "eval.json"))
    out = exported["base"] / ("eval_" + artifact.replace(".", "_"))
    top1, _ = in_process(TRAIN + exported["cache"] + ["mode=eval", "eval.checkpoint={}".format(
        exported["export"] / artifact)], out)
    result = read_json(str(out / "eval.json"))
    assert result["top1"] == reference["top1"] == top1
    assert result["num_images"] == reference["num_images"]
    assert result["format"] == {"model.pb": "frozen_pb", "saved_model": "saved_model",
                                "model.tflite": "tflite"}[artifact]
    assert result["checkpoint"] == str(exported["export"] / artifact)


def test_report_has_a_row_per_artifact_and_flags_losses(exported, tmp_path):
    report = read_json(str(exported["export"] / "report.json"))
    names = [row["name"] for row in report["rows"]]
    assert names == ["checkpoint", "model.pb", "saved_model/", "model.tflite", "model_fp16.tflite",
                     "model_int8.tflite"]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["model.pb"]["top1"] == rows["model.tflite"]["top1"] == rows["checkpoint"]["top1"]
    assert report["num_images"] == 64
    for row in report["rows"]:
        assert row["flagged"] == (rows["checkpoint"]["top1"] - row["top1"] > 0.02)
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["size_bytes"] > 0
    assert (exported["export"] / "report.md").read_text().count("\n| ") == 7  # header + 6 rows
    # The tool again, with every loss flagged: it rewrites both files.
    assert export_report.main([str(exported["base"] / "export"), "export.max_top1_drop=0",
                               "export.report_runs=2"]) == 0
    again = read_json(str(exported["export"] / "report.json"))
    assert [r["flagged"] for r in again["rows"]] == [r["top1"] < again["rows"][0]["top1"] for r in again["rows"]]


def test_artifact_without_export_json_and_export_of_an_artifact_are_user_errors(exported, tmp_path):
    lonely = tmp_path / "model.tflite"
    lonely.write_bytes((exported["export"] / "model.tflite").read_bytes())
    with pytest.raises(UserError, match="export.json"):
        prepare(run_config(*(exported["cache"] + ["mode=eval", "eval.checkpoint={}".format(lonely)])),
                str(tmp_path / "run"))
    with pytest.raises(UserError, match="mode=export needs the checkpoint"):
        prepare(run_config(*(exported["cache"] + ["mode=export", "eval.checkpoint={}".format(
            exported["export"] / "model.pb")])), str(tmp_path / "run2"))
    assert export_report.main([str(tmp_path)]) == 2


def test_mode_predict_on_an_artifact_gives_the_checkpoints_classes(exported, tmp_path):
    image = tmp_path / "noise.png"
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        pixels = np.random.RandomState(2).randint(0, 255, (40, 48, 3)).astype(np.uint8)
        image.write_bytes(sess.run(tf.image.encode_png(pixels)))
    found = {}
    for name, checkpoint in (("checkpoint", exported["train"]), ("tflite", exported["export"] / "model.tflite")):
        in_process(exported["cache"] + ["mode=predict", "eval.checkpoint={}".format(checkpoint),
                                        "predict.images=[{}]".format(image)], tmp_path / name)
        found[name] = read_json(predictions_path(str(tmp_path / name)))[0]["top5"]
    assert [c["index"] for c in found["tflite"]] == [c["index"] for c in found["checkpoint"]]
    np.testing.assert_allclose([c["probability"] for c in found["tflite"]],
                               [c["probability"] for c in found["checkpoint"]], atol=1e-5)


@pytest.mark.parametrize("overrides,key", [
    (["export.quantize=[int8,int8]"], "export.quantize"), (["export.quantize=[]"], "export.quantize"),
    (["export.calibration_images=0"], "export.calibration_images"), (["export.report_runs=0"], "export.report_runs"),
    (["export.report_images=0"], "export.report_images"), (["export.max_top1_drop=2"], "export.max_top1_drop")])
def test_bad_export_settings_name_their_key(overrides, key):
    with pytest.raises(UserError, match=key):
        check_export(run_config(*overrides).export)
