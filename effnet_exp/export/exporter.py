"""mode=export: a checkpoint as a frozen GraphDef (model.pb), a SavedModel, TFLite files and export.json.

Every graph is built fresh for inference (batch norm on its moving statistics, no dropout or drop-connect, no
input pipeline, no optimizer), its variables are restored by name through WeightsPlan (the EMA shadows when
the checkpoint has them and export.use_ema), and swish is spelled `x * sigmoid(x)` so that converters (ATC,
TFLite-style tools) see plain Sigmoid and Mul ops. The whole `export/` folder is built under a temporary
name in the run folder and renamed into place at the end: it is there complete or not at all.
"""
import dataclasses
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from effnet_exp import interrupts
from effnet_exp.data.config import Normalization
from effnet_exp.data.preprocessing import CROP_PADDING, normalization_constants, normalize, preprocess_for_eval
from effnet_exp.errors import UserError
from effnet_exp.export import tflite
from effnet_exp.export.config import TFLITE_FORMATS, ExportFormat, Int8IO, Quantize, check_export, tflite_name
from effnet_exp.model.config import Activation
from effnet_exp.model.restore import InferenceModel

log = logging.getLogger(__name__)

EXPORT_DIR = "export"
FROZEN_PB = "model.pb"
IMAGE_BYTES_PB = "model_image_bytes.pb"
SAVED_MODEL_DIR = "saved_model"
MANIFEST = "export.json"

INPUT = "input"
IMAGE_BYTES = "image_bytes"
LOGITS = "logits"
PROBABILITIES = "probabilities"
OUTPUTS = (LOGITS, PROBABILITIES)
SERVING_SIGNATURE = "serving_default"
IMAGE_BYTES_SIGNATURE = "image_bytes"

# Activations that have a converter-friendly spelling with the same values (and no variables of their own).
EXPORT_ACTIVATIONS = {Activation.swish: Activation.swish_sigmoid, Activation.silu: Activation.swish_sigmoid}

# Never in an exported graph: variables, Python callbacks, randomness (dropout, drop-connect), input pipelines.
FORBIDDEN_OPS = frozenset([
    "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "VariableV2", "Variable", "VarIsInitializedOp",
    "PyFunc", "PyFuncStateless", "EagerPyFunc", "RandomUniform", "RandomUniformInt", "RandomStandardNormal",
    "TruncatedNormal", "StatelessRandomUniformV2", "SaveV2", "RestoreV2",
])
FORBIDDEN_PREFIXES = ("Iterator", "AnonymousIterator", "MakeIterator", "Dataset")

ALLOWED_OPS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "allowed_ops.txt")

# The export's self-check: the frozen graph's logits may differ from the restored variables' by this much,
# relative to the largest logit (Grappler folds constants differently; tests check 1e-5 on small models).
SELF_CHECK_TOLERANCE = 1e-4


def export_model_config(model_cfg):
    """A copy of model_cfg whose activation builds from plain ops; the variables are the same."""
    activation = Activation(model_cfg.activation)
    return dataclasses.replace(model_cfg, activation=EXPORT_ACTIVATIONS.get(activation, activation))


def normalization_info(normalization):
    """How `input` is scaled: (x - mean) / std per RGB channel on the 0-255 scale."""
    try:
        key = Normalization(normalization)
    except ValueError:
        raise UserError("normalization {!r} is not one of {}".format(
            normalization, ", ".join(n.value for n in Normalization)))
    mean, std = normalization_constants(key)
    return {"name": key.value, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "formula": "(x - mean) / std per RGB channel, x on the 0-255 scale"}


def graph_op_types(graph_def):
    """Sorted op types of a GraphDef, including those inside its function library."""
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types.update(node.op for node in function.node_def)
    return sorted(types)


def forbidden_op_types(op_types):
    return sorted(t for t in op_types if t in FORBIDDEN_OPS or t.startswith(FORBIDDEN_PREFIXES))


def allowed_op_types(path=ALLOWED_OPS_FILE):
    """The op types model.pb may use (allowed_ops.txt: one a line, # comments)."""
    with open(path) as f:
        return sorted({line.split("#", 1)[0].strip() for line in f} - {""})


def atc_output_name(soc_version):
    """Ascend310 -> model_310 (ATC appends .om)."""
    short = soc_version[len("Ascend"):] if soc_version.lower().startswith("ascend") else soc_version
    return "model_" + (short or soc_version).lower()


def atc_command(soc_version, batch_size, image_size, model_file=FROZEN_PB, dynamic_batch_sizes=None):
    """The ATC command line compiling model_file for soc_version (run in the export folder)."""
    batch = -1 if dynamic_batch_sizes else int(batch_size)
    parts = ["atc", "--model=" + model_file, "--framework=3",
             '--input_shape="{}:{},{},{},3"'.format(INPUT, batch, image_size, image_size)]
    if dynamic_batch_sizes:
        parts.append('--dynamic_batch_size="{}"'.format(",".join(str(int(b)) for b in dynamic_batch_sizes)))
    parts += ['--out_nodes="{}"'.format(";".join(name + ":0" for name in OUTPUTS)),
              "--soc_version=" + soc_version, "--output=" + atc_output_name(soc_version)]
    return " ".join(parts)


def _float_input(spec):
    """The `input` placeholder and the model's input made from it."""
    images = tf.compat.v1.placeholder(tf.float32, [spec.batch_size, spec.image_size, spec.image_size, 3],
                                      name=INPUT)
    return images, normalize(images, spec.normalization, rows=False) if spec.normalize_in_graph else images


def _image_bytes_input(spec):
    """The `image_bytes` placeholder and the eval preprocessing of each element."""
    data = tf.compat.v1.placeholder(tf.string, [spec.batch_size], name=IMAGE_BYTES)
    decoded = tf.compat.v1.map_fn(
        lambda one: preprocess_for_eval(one, spec.image_size, crop_padding=spec.crop_padding),
        data, dtype=tf.float32, back_prop=False, name="preprocess")
    return data, normalize(decoded, spec.normalization)


_INPUTS = {INPUT: _float_input, IMAGE_BYTES: _image_bytes_input}


class _Restored(object):
    """One inference graph with its variables restored from the checkpoint, and its session."""

    def __init__(self, spec, towers, checkpoint, use_ema, session_config):
        self.graph = tf.Graph()
        self.towers = {}
        self.model = None
        with self.graph.as_default():
            for i, kind in enumerate(towers):
                # The first tower owns the root names (input/image_bytes, logits, probabilities).
                with tf.compat.v1.name_scope(kind) if i else _null_scope():
                    x, model_input = _INPUTS[kind](spec)
                    if self.model is None:
                        self.model = InferenceModel(model_input, spec.cfg, checkpoint, use_ema)
                        logits = self.model.logits
                    else:  # later towers share the first one's variables
                        logits = self.model.tower(model_input)
                    self.towers[kind] = (x, logits, tf.nn.softmax(logits, name=PROBABILITIES))
        self.sess = tf.compat.v1.Session(graph=self.graph, config=session_config)
        try:
            self.model.restore(self.sess)
        except BaseException:
            self.sess.close()
            raise

    def freeze(self):
        """The graph with every variable folded into a constant, cut down to the two outputs."""
        graph_def = self.graph.as_graph_def()
        with self.graph.as_default():
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(self.sess, graph_def, list(OUTPUTS))
        pruned = tf.compat.v1.graph_util.remove_training_nodes(
            frozen, protected_nodes=[INPUT, IMAGE_BYTES] + list(OUTPUTS))
        # remove_training_nodes keeps only the nodes: the function library (TF 2.x control flow) goes back in.
        pruned.library.CopyFrom(frozen.library)
        pruned.versions.CopyFrom(frozen.versions)
        frozen = _fold_weight_arithmetic(_prune_library(pruned))
        for node in frozen.node:
            node.device = ""
            if "_class" in node.attr:  # colocation with variables that no longer exist
                del node.attr["_class"]
        return frozen

    def close(self):
        self.sess.close()


# Arithmetic on constants only: the batch-norm folding (kernel * gamma * rsqrt(variance + eps), ...).
_FOLDABLE_OPS = frozenset(["Identity", "Mul", "Rsqrt", "Reshape", "Sub", "Add", "AddV2"])


def _fold_weight_arithmetic(graph_def):
    """Replaces each _FOLDABLE_OPS node computed from constants alone by a Const of its value, so the frozen
    graph holds the folded weights (Conv2D -> BiasAdd), not the arithmetic that made them."""
    constant = set(node.name for node in graph_def.node if node.op == "Const")
    foldable = []
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    for op in graph.get_operations():  # in topological order
        if (op.type in _FOLDABLE_OPS and op.inputs and not op.control_inputs and len(op.outputs) == 1
                and all(t.op.name in constant for t in op.inputs)):
            constant.add(op.name)
            foldable.append(op)
    # Fold only where a constant result meets the rest of the graph (the others are then unused).
    frontier = [op for op in foldable
                if any(c.name not in constant for c in op.outputs[0].consumers())]
    if not frontier:
        return graph_def
    with tf.compat.v1.Session(graph=graph) as sess:
        values = sess.run([op.outputs[0] for op in frontier])
    replaced = {}
    for op, value in zip(frontier, values):
        replaced[op.name] = tf.compat.v1.make_tensor_proto(value, dtype=op.outputs[0].dtype)
    folded = tf.compat.v1.GraphDef()
    folded.versions.CopyFrom(graph_def.versions)
    folded.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.name in replaced:
            new = folded.node.add(name=node.name, op="Const", device=node.device)
            new.attr["dtype"].type = replaced[node.name].dtype
            new.attr["value"].tensor.CopyFrom(replaced[node.name])
        else:
            folded.node.add().CopyFrom(node)
    return tf.compat.v1.graph_util.extract_sub_graph(folded, list(OUTPUTS) + [
        node.name for node in folded.node if node.op == "Placeholder"])


def _called_functions(nodes):
    """Names of the functions these NodeDefs call: as their op type or through attrs (If/While branches...)."""
    names = set()
    for node in nodes:
        names.add(node.op)
        for value in node.attr.values():
            if value.HasField("func"):
                names.add(value.func.name)
            names.update(f.name for f in value.list.func)
    return names


def _prune_library(graph_def):
    """Keeps only the library functions the graph's nodes reach (a session graph holds every tower's)."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    if not functions:
        return graph_def
    reached, todo = set(), _called_functions(graph_def.node) & set(functions)
    while todo:
        name = todo.pop()
        reached.add(name)
        todo |= (_called_functions(functions[name].node_def) & set(functions)) - reached
    kept = [f for f in graph_def.library.function if f.signature.name in reached]
    gradients = [g for g in graph_def.library.gradient if g.function_name in reached]
    del graph_def.library.function[:]
    del graph_def.library.gradient[:]
    graph_def.library.function.extend(kept)
    graph_def.library.gradient.extend(gradients)
    return graph_def


class _null_scope(object):
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Spec(object):
    def __init__(self, model_cfg, image_size, normalization, batch_size, normalize_in_graph, crop_padding):
        self.cfg = export_model_config(model_cfg)
        self.image_size = int(image_size)
        self.normalization = Normalization(normalization)
        self.batch_size = batch_size
        self.normalize_in_graph = normalize_in_graph
        self.crop_padding = crop_padding


def run_frozen(graph_def, feeds, fetches=OUTPUTS):
    """Runs a frozen GraphDef in a graph of its own: feeds {input name: array} -> list of arrays."""
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as sess:
        return sess.run([name + ":0" for name in fetches],
                        feed_dict={name + ":0": value for name, value in feeds.items()})


def _self_check(restored, frozen, batch_size, image_size):
    """The frozen graph must give the restored variables' logits; returns the largest difference."""
    images = np.random.RandomState(0).normal(size=(batch_size or 2, image_size, image_size, 3)).astype(np.float32)
    x, logits, _ = restored.towers[INPUT]
    expected = restored.sess.run(logits, {x: images})
    got = run_frozen(frozen, {INPUT: images}, [LOGITS])[0]
    diff = float(np.max(np.abs(got - expected)))
    if not diff <= SELF_CHECK_TOLERANCE * max(1.0, float(np.max(np.abs(expected)))):
        raise RuntimeError("the frozen graph's logits differ from the checkpoint's by {}".format(diff))
    return diff


def _tensor_entry(name, dtype, shape):
    return {"name": name, "tensor": name + ":0", "dtype": dtype, "shape": [-1 if d is None else int(d) for d in shape]}


def _write_graph(graph_def, path):
    with open(path, "wb") as f:
        f.write(graph_def.SerializeToString())


def _save_model(restored, path):
    sm = tf.compat.v1.saved_model
    signatures = {}
    for kind, key in ((INPUT, SERVING_SIGNATURE), (IMAGE_BYTES, IMAGE_BYTES_SIGNATURE)):
        if kind in restored.towers:
            x, logits, probabilities = restored.towers[kind]
            with restored.graph.as_default():
                signatures[key] = sm.predict_signature_def(
                    inputs={kind: x}, outputs={LOGITS: logits, PROBABILITIES: probabilities})
    with restored.graph.as_default():
        builder = sm.Builder(path)
        builder.add_meta_graph_and_variables(restored.sess, [sm.tag_constants.SERVING],
                                             signature_def_map=signatures, strip_default_attrs=True)
        builder.save()
    return sorted(signatures)


def export_model(checkpoint, model_cfg, image_size, normalization, run_dir, export_cfg, class_names=None,
                 crop_padding=CROP_PADDING, session_config=None, calibration=None):
    """Writes run_dir/export/ (model.pb, model_image_bytes.pb, saved_model/, *.tflite, export.json as
    configured) and returns the export.json content. calibration: normalised float images [N, S, S, 3] of the
    training split (int8 TFLite needs them; the TFLite checks use the first few when given)."""
    check_export(export_cfg)
    tflite_modes = [Quantize(q) for q in export_cfg.quantize] if ExportFormat(export_cfg.format) in TFLITE_FORMATS \
        else []
    if Quantize.int8 in tflite_modes and (calibration is None or not len(calibration)):
        raise UserError("export.quantize=int8 needs calibration images from the dataset's training split")
    norm = normalization_info(normalization)
    fmt = ExportFormat(export_cfg.format)
    frozen_wanted = fmt in (ExportFormat.frozen_pb, ExportFormat.all)
    saved_wanted = fmt in (ExportFormat.saved_model, ExportFormat.all)
    spec = _Spec(model_cfg, image_size, norm["name"], export_cfg.batch_size, export_cfg.normalize_in_graph,
                 crop_padding)
    num_classes = model_cfg.num_classes
    out_dir = os.path.join(os.path.abspath(run_dir), EXPORT_DIR)
    tmp_dir = tempfile.mkdtemp(dir=os.path.abspath(run_dir), prefix="." + EXPORT_DIR + ".", suffix=".tmp")
    try:
        manifest = _export_into(tmp_dir, checkpoint, spec, num_classes, norm, export_cfg, frozen_wanted,
                                saved_wanted, session_config, tflite_modes, calibration)
        manifest["export_dir"] = out_dir
        manifest["class_names"] = list(class_names) if class_names else None
        with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        with interrupts.deferred():  # the swap with an older export: two renames
            _move_into_place(tmp_dir, out_dir)
    except (IOError, OSError) as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise UserError("cannot write the export to {}: {}".format(out_dir, err.strerror or err))
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return manifest


def _export_into(folder, checkpoint, spec, num_classes, norm, export_cfg, frozen_wanted, saved_wanted,
                 session_config, tflite_modes=(), calibration=None):
    batch = spec.batch_size
    size = spec.image_size
    float_inputs = [_tensor_entry(INPUT, "float32", [batch, size, size, 3])]
    bytes_inputs = [_tensor_entry(IMAGE_BYTES, "string", [batch])]
    outputs = [_tensor_entry(LOGITS, "float32", [batch, num_classes]),
               _tensor_entry(PROBABILITIES, "float32", [batch, num_classes])]
    files = {}
    manifest = {
        "checkpoint": checkpoint, "model": spec.cfg.name, "image_size": size, "num_classes": num_classes,
        "batch_size": batch, "format": ExportFormat(export_cfg.format).value,
        "tensorflow_version": tf.__version__, "layout": "NHWC",
        "inputs": float_inputs, "outputs": outputs,
        "normalization": dict(norm, in_graph=spec.normalize_in_graph),
        "input_scale": ("0-255 RGB (normalised inside the graph)" if spec.normalize_in_graph
                        else "normalised RGB: apply `normalization` to 0-255 pixels first"),
        "preprocessing": {"eval": "centre crop of side image_size / (image_size + crop_padding) * min(height, "
                                  "width), bicubic resize to image_size (legacy, no half-pixel centres)",
                          "crop_padding": int(spec.crop_padding)},
        "activation": spec.cfg.activation.value,
        "files": files,
    }
    towers = [INPUT] + ([IMAGE_BYTES] if export_cfg.image_bytes_graph and saved_wanted else [])
    restored = _Restored(spec, towers, checkpoint, export_cfg.use_ema, session_config)
    try:
        manifest["weights_restored"] = restored.model.describe()
        manifest["weights"] = "ema" if restored.model.plan.uses_ema else "raw"
        log.info("exporting %s with %s", spec.cfg.name, restored.model.describe())
        if frozen_wanted or tflite_modes:
            frozen = restored.freeze()
            manifest["self_check_max_abs_diff"] = _self_check(restored, frozen, batch, size)
        if tflite_modes:
            files["tflite"] = _export_tflite(folder, frozen, restored, spec, export_cfg, tflite_modes, norm,
                                             calibration)
        if frozen_wanted:
            _write_graph(frozen, os.path.join(folder, FROZEN_PB))
            interrupts.fault_point("exporting")
            op_types = graph_op_types(frozen)
            files["frozen_pb"] = {"path": FROZEN_PB, "inputs": float_inputs, "outputs": outputs,
                                  "op_types": op_types}
            unexpected = sorted(set(op_types) - set(allowed_op_types()))
            if unexpected:
                log.warning("model.pb uses op types outside %s: %s", ALLOWED_OPS_FILE, ", ".join(unexpected))
        if saved_wanted:
            signatures = _save_model(restored, os.path.join(folder, SAVED_MODEL_DIR))
            files["saved_model"] = {"path": SAVED_MODEL_DIR, "tags": ["serve"], "signatures": {
                SERVING_SIGNATURE: {"inputs": float_inputs, "outputs": outputs}}}
            if IMAGE_BYTES_SIGNATURE in signatures:
                files["saved_model"]["signatures"][IMAGE_BYTES_SIGNATURE] = {"inputs": bytes_inputs,
                                                                             "outputs": outputs}
    finally:
        restored.close()
    if export_cfg.image_bytes_graph and frozen_wanted:
        restored = _Restored(spec, [IMAGE_BYTES], checkpoint, export_cfg.use_ema, session_config)
        try:
            frozen = restored.freeze()
        finally:
            restored.close()
        _write_graph(frozen, os.path.join(folder, IMAGE_BYTES_PB))
        files["image_bytes_pb"] = {"path": IMAGE_BYTES_PB, "inputs": bytes_inputs, "outputs": outputs,
                                   "op_types": graph_op_types(frozen),
                                   "note": "JPEG or PNG bytes, eval preprocessing and normalisation inside; "
                                           "for TensorFlow, not for ATC"}
    manifest["atc"] = _atc_entries(export_cfg.soc_versions, batch, size) if frozen_wanted else []
    if not frozen_wanted:
        manifest["atc_note"] = "ATC compiles model.pb: export with export.format=frozen_pb or all"
    return manifest


# The TFLite checks against the checkpoint: this many images (the first calibration images when there are).
CHECK_IMAGES = 8


def _in_input_scale(images, norm, in_graph):
    """Normalised images in the scale of the graph's `input` (0-255 when it normalises them itself)."""
    images = np.asarray(images, np.float32)
    if not in_graph:
        return images
    return images * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32)


def _check_batch(spec, calibration):
    """(images, what they are): CHECK_IMAGES of them, or exactly export.batch_size when that is fixed."""
    count = int(spec.batch_size or CHECK_IMAGES)
    if calibration is not None and len(calibration):
        images = np.asarray(calibration[:count], np.float32)
        images = np.concatenate([images] * int(np.ceil(count / float(len(images)))))[:count]
        return images, "the first {} calibration images".format(min(count, len(calibration)))
    images = np.random.RandomState(0).normal(size=(count, spec.image_size, spec.image_size, 3))
    return images.astype(np.float32), "{} standard-normal images (seed 0)".format(count)


def _export_tflite(folder, frozen, restored, spec, export_cfg, modes, norm, calibration):
    """Converts the frozen graph once per quantize mode; each file's export.json entry, with its outputs'
    largest difference to the checkpoint's on a small batch."""
    source = os.path.join(folder, ".model_for_tflite.pb")
    _write_graph(frozen, source)
    check, check_what = _check_batch(spec, calibration)
    check = _in_input_scale(check, norm, spec.normalize_in_graph)
    x, logits, probabilities = restored.towers[INPUT]
    expected = restored.sess.run({LOGITS: logits, PROBABILITIES: probabilities}, {x: check})
    scaled = None if calibration is None else _in_input_scale(calibration, norm, spec.normalize_in_graph)
    entries = []
    try:
        for mode in modes:
            log.info("converting to TFLite (%s)", mode.value)
            data = tflite.convert(source, mode, spec.image_size, spec.batch_size, INPUT, OUTPUTS,
                                  calibration=scaled, int8_io=export_cfg.int8_io)
            name = tflite_name(mode)
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            interrupts.fault_point("exporting")
            entry = dict(tflite.describe(data), path=name, quantize=mode.value, size_bytes=len(data))
            if mode == Quantize.int8:
                entry["calibration_images"] = int(len(calibration))
                entry["int8_io"] = Int8IO(export_cfg.int8_io).value
            entry["check"] = _tflite_check(data, check, expected, check_what)
            entries.append(entry)
    finally:
        os.remove(source)
    return entries


def _tflite_check(data, images, expected, what):
    runner = tflite.TFLiteRunner(data)
    got = {name: runner(images, name) for name in OUTPUTS}
    return {"images": what,
            "max_abs_diff_logits": float(np.max(np.abs(got[LOGITS] - expected[LOGITS]))),
            "max_abs_diff_probabilities": float(np.max(np.abs(got[PROBABILITIES] - expected[PROBABILITIES]))),
            "top1_agreement": float(np.mean(np.argmax(got[PROBABILITIES], 1) ==
                                            np.argmax(expected[PROBABILITIES], 1)))}


def _atc_entries(soc_versions, batch, size):
    entries = []
    for soc in soc_versions:
        entry = {"soc_version": soc, "batch_size": batch or 1,
                 "command": atc_command(soc, batch or 1, size), "cwd": "the export folder"}
        if batch is None:
            entry["note"] = ("model.pb has a dynamic batch; this command compiles batch 1. For several sizes: "
                             + atc_command(soc, None, size, dynamic_batch_sizes=(1, 2, 4, 8)))
        entries.append(entry)
    return entries


def _move_into_place(tmp_dir, out_dir):
    """Renames the finished folder to out_dir; an older export there is replaced only once this one is whole."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp_dir, 0o777 & ~mask)  # mkdtemp makes folders private; results are ordinary folders
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(dir=os.path.dirname(out_dir), prefix="." + EXPORT_DIR + ".", suffix=".old")
        os.rename(out_dir, os.path.join(old, EXPORT_DIR))
    os.rename(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def summary_text(manifest):
    """What the run prints at the end: where the files are, their tensors and the atc command lines."""
    batch = manifest["batch_size"]
    lines = ["exported {} ({} weights, {}x{}, batch {}) to {}".format(
        manifest["model"], manifest["weights"], manifest["image_size"], manifest["image_size"],
        "dynamic" if batch is None else batch, manifest["export_dir"])]
    for key in ("frozen_pb", "image_bytes_pb", "saved_model"):
        entry = manifest["files"].get(key)
        if not entry:
            continue
        if key == "saved_model":
            for name, sig in sorted(entry["signatures"].items()):
                lines.append("  {}/ signature {}: {}".format(entry["path"], name, _tensors(sig)))
        else:
            lines.append("  {}: {}".format(entry["path"], _tensors(entry)))
    for entry in manifest["files"].get("tflite", []):
        check = entry["check"]
        lines.append("  {} ({}, {} bytes): {}; against the checkpoint on {}: max |probability diff| {:.2g}, "
                     "top-1 agreement {:.2f}".format(
                         entry["path"], entry["quantize"], entry["size_bytes"], _tflite_tensors(entry),
                         check["images"], check["max_abs_diff_probabilities"], check["top1_agreement"]))
    norm = manifest["normalization"]
    lines.append("  input normalisation: {} (mean {}, std {}){}".format(
        norm["name"], norm["mean"], norm["std"], ", inside the graph" if norm["in_graph"] else ""))
    if manifest["atc"]:
        note = "" if batch else " (model.pb's batch is dynamic: these compile batch 1)"
        lines.append("atc command lines, run in {}{}:".format(manifest["export_dir"], note))
        lines.extend("  " + entry["command"] for entry in manifest["atc"])
    return "\n".join(lines)


def _tflite_tensors(entry):
    def fmt(t):
        return "{} {} {}".format(t["name"], t["dtype"], t["shape"])
    return "{} -> {}".format(", ".join(fmt(t) for t in entry["inputs"]), ", ".join(fmt(t) for t in entry["outputs"]))


def _tensors(entry):
    def fmt(t):
        return "{} {} {}".format(t["tensor"], t["dtype"], t["shape"])
    return "{} -> {}".format(", ".join(fmt(t) for t in entry["inputs"]), ", ".join(fmt(t) for t in entry["outputs"]))
