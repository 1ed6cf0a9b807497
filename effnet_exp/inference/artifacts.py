"""What eval / predict / the export report run: a checkpoint, or an exported artifact (a frozen .pb, a
saved_model/ folder, a .tflite file). One class per format, each giving the class log-probabilities of a batch
of preprocessed (normalised) images inside the caller's graph; restore(sess) after the session is made.

An artifact brings its model through the export.json written beside it (its name, size, class count, class
names, normalisation). The frozen graph and the SavedModel are imported into the caller's graph; the TFLite
file runs in tf.lite.Interpreter through a py_func (the interpreter runs no TensorFlow session, so nothing
nests).
"""
import json
import os

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from effnet_exp.errors import UserError
from effnet_exp.export import tflite
from effnet_exp.export.exporter import INPUT, LOGITS, MANIFEST, SERVING_SIGNATURE
from effnet_exp.model.restore import InferenceModel
from effnet_exp.training.checkpoints import checkpoint_step

CHECKPOINT = "checkpoint"
FROZEN_PB = "frozen_pb"
SAVED_MODEL = "saved_model"
TFLITE = "tflite"
SAVED_MODEL_FILE = "saved_model.pb"


def artifact_format(path):
    """The exported format at path (frozen_pb, saved_model, tflite), or None for a checkpoint."""
    if not isinstance(path, str) or path.startswith("package:"):
        return None
    path = os.path.expanduser(path)
    if path.endswith(".tflite"):
        return TFLITE
    if path.endswith(".pb") and not path.endswith(SAVED_MODEL_FILE):
        return FROZEN_PB
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        return SAVED_MODEL
    return None


def artifact_manifest(path):
    """The export.json of the export an artifact belongs to (beside it; above it for saved_model/)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError("eval.checkpoint={}: no such file or folder".format(path))
    folder = os.path.dirname(path.rstrip(os.sep))
    manifest_path = os.path.join(folder, MANIFEST)
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (IOError, OSError, ValueError) as err:
        raise UserError("eval.checkpoint={}: cannot read {} beside it ({}); the artifact's model, image size and "
                        "normalisation come from the export.json that mode=export wrote with it".format(
                            path, manifest_path, getattr(err, "strerror", None) or err))
    for key in ("model", "image_size", "num_classes", "normalization"):
        if key not in manifest:
            raise UserError("{} has no {!r}: not an export.json of mode=export".format(manifest_path, key))
    return manifest


class CheckpointModel(object):
    """A training checkpoint through the model's own graph (InferenceModel)."""
    format = CHECKPOINT

    def __init__(self, checkpoint, model_cfg, use_ema):
        self.path = checkpoint
        self.model_cfg = model_cfg
        self.use_ema = use_ema
        self._model = None

    def log_probabilities(self, images):
        self._model = InferenceModel(images, self.model_cfg, self.path, self.use_ema)
        return tf.nn.log_softmax(tf.cast(self._model.logits, tf.float32))

    def restore(self, sess):
        self._model.restore(sess)

    @property
    def weights(self):
        return "ema" if self._model.plan.uses_ema else "raw"

    @property
    def step(self):
        return checkpoint_step(self.path)

    def describe(self):
        return self._model.describe()


class _Exported(object):
    """What every exported artifact shares: its export.json, and its input's scale."""

    def __init__(self, path, manifest):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.manifest = manifest
        self.weights = manifest.get("weights")
        self.step = None

    def _input(self, images):
        """Normalised images as the artifact's input wants them (0-255 when it normalises in the graph)."""
        norm = self.manifest["normalization"]
        if not norm.get("in_graph"):
            return images
        return images * tf.constant(norm["std"], tf.float32) + tf.constant(norm["mean"], tf.float32)

    def restore(self, sess):
        pass

    def describe(self):
        return "{} {} ({} of {}, {} weights)".format(self.format, self.path, self.manifest["model"],
                                                     self.manifest.get("checkpoint"), self.weights)


class FrozenGraphModel(_Exported):
    format = FROZEN_PB

    def log_probabilities(self, images):
        graph_def = tf.compat.v1.GraphDef()
        try:
            with open(self.path, "rb") as f:
                graph_def.ParseFromString(f.read())
        except (IOError, OSError) as err:
            raise UserError("cannot read {}: {}".format(self.path, err.strerror or err))
        except Exception as err:  # protobuf's DecodeError
            raise UserError("{} is not a frozen GraphDef: {}".format(self.path, err))
        logits, = tf.compat.v1.import_graph_def(graph_def, input_map={INPUT + ":0": self._input(images)},
                                                return_elements=[LOGITS + ":0"], name="artifact")
        return tf.nn.log_softmax(logits)


class SavedModelModel(_Exported):
    format = SAVED_MODEL

    def __init__(self, path, manifest):
        super(SavedModelModel, self).__init__(path, manifest)
        self._saver = None

    def _meta_graph(self):
        # The SavedModel's own proto: the public loader would need the session before the graph is finalised.
        proto = _saved_model_proto(os.path.join(self.path, SAVED_MODEL_FILE))
        for meta_graph in proto.meta_graphs:
            if "serve" in meta_graph.meta_info_def.tags and SERVING_SIGNATURE in meta_graph.signature_def:
                return meta_graph
        raise UserError("{} has no 'serve' graph with a {} signature".format(self.path, SERVING_SIGNATURE))

    def log_probabilities(self, images):
        meta_graph = self._meta_graph()
        signature = meta_graph.signature_def[SERVING_SIGNATURE]
        input_name = signature.inputs[INPUT].name
        logits_name = signature.outputs[LOGITS].name
        self._saver = tf.compat.v1.train.import_meta_graph(
            meta_graph, input_map={input_name: self._input(images)}, import_scope="artifact",
            clear_devices=True)
        logits = tf.compat.v1.get_default_graph().get_tensor_by_name("artifact/" + logits_name)
        return tf.nn.log_softmax(logits)

    def restore(self, sess):
        with sess.graph.as_default():
            self._saver.restore(sess, os.path.join(self.path, "variables", "variables"))


def _saved_model_proto(path):
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


class TFLiteModel(_Exported):
    format = TFLITE

    def __init__(self, path, manifest, threads=0):
        super(TFLiteModel, self).__init__(path, manifest)
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except (IOError, OSError) as err:
            raise UserError("cannot read {}: {}".format(self.path, err.strerror or err))
        try:
            self.runner = tflite.TFLiteRunner(data, threads)
        except ValueError as err:
            raise UserError("{} is not a TFLite model: {}".format(self.path, err))
        self.threads = self.runner.threads

    def logits(self, images):
        """NumPy: float32 logits of images already in the model's input scale."""
        return self.runner(images, LOGITS)

    def _log_softmax(self, images):
        logits = self.logits(images).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))).astype(np.float32)

    def log_probabilities(self, images):
        log_p = tf.compat.v1.py_func(self._log_softmax, [self._input(images)], tf.float32, stateful=True,
                                     name="tflite")
        log_p.set_shape([None, int(self.manifest["num_classes"])])
        return log_p

    def describe(self):
        return "{}, {} interpreter threads".format(super(TFLiteModel, self).describe(),
                                                  self.threads or "default")


def open_model(path, model_cfg=None, use_ema=True, threads=0):
    """The model at eval.checkpoint: a checkpoint prefix (model_cfg, use_ema) or an exported artifact."""
    fmt = artifact_format(path)
    if fmt is None:
        return CheckpointModel(path, model_cfg, use_ema)
    manifest = artifact_manifest(path)
    if fmt == TFLITE:
        return TFLiteModel(path, manifest, threads)
    return {FROZEN_PB: FrozenGraphModel, SAVED_MODEL: SavedModelModel}[fmt](path, manifest)
