"""Loading model weights from a checkpoint by name, never through its meta graph.

Used for pretrained initialisation, evaluation, prediction and export alike. Strict: every model variable must
be in the checkpoint with the right shape, except the classifier when the class count differs (a new head).
"""
import logging
import os

import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.model.config import Weights
from effnet_exp.model.efficientnet import build_efficientnet
from effnet_exp.model.pretrained import ensure_imported
from effnet_exp.run_folder import resolve_checkpoint

log = logging.getLogger(__name__)

EMA_SUFFIX = "/ExponentialMovingAverage"
HEAD_SCOPE = "head/dense/"


def model_variables(scope, graph=None):
    """Weights and batch-norm statistics of the model under scope; no optimizer slots, no global step."""
    graph = graph or tf.compat.v1.get_default_graph()
    wanted = set(graph.get_collection(tf.compat.v1.GraphKeys.TRAINABLE_VARIABLES))
    wanted.update(graph.get_collection(tf.compat.v1.GraphKeys.MOVING_AVERAGE_VARIABLES))
    return [v for v in graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES)
            if v in wanted and v.op.name.startswith(scope + "/")]


def checkpoint_reader(prefix):
    """tf's CheckpointReader of prefix; UserError naming the prefix and its index file when it cannot be read
    (a truncated or corrupt .index, a file that is no checkpoint)."""
    try:
        return tf.compat.v1.train.NewCheckpointReader(prefix)
    except tf.errors.OpError as err:
        index = prefix + ".index" if os.path.isfile(prefix + ".index") else prefix
        detail = (err.message or str(err)).strip().splitlines()
        raise UserError("checkpoint {} cannot be read: {} is truncated or corrupt ({})".format(
            prefix, index, detail[0] if detail else type(err).__name__))


def checkpoint_shapes(prefix):
    return checkpoint_reader(prefix).get_variable_to_shape_map()


def checkpoint_num_classes(prefix, scope):
    """The class count of the checkpoint's classifier, or None when it has none under scope."""
    shape = checkpoint_shapes(prefix).get(scope + "/" + HEAD_SCOPE + "bias")
    return int(shape[0]) if shape else None


class WeightsPlan(object):
    """Which checkpoint tensor feeds which variable; raises one UserError listing every problem."""

    def __init__(self, prefix, variables, scope, weights=Weights.ema, allow_new_head=False):
        """weights: a Weights member (or its value): ema takes the EMA shadows when the checkpoint has them."""
        shapes = checkpoint_shapes(prefix)
        self.prefix = prefix
        self.uses_ema = Weights(weights) == Weights.ema and any(k.endswith(EMA_SUFFIX) for k in shapes)
        self.fresh = []  # variables left at their initial values (the new head)
        self.var_map = {}
        missing, mismatched = [], []
        for var in variables:
            name = var.op.name
            key = name + EMA_SUFFIX if self.uses_ema and name + EMA_SUFFIX in shapes else name
            want = var.shape.as_list()
            if key not in shapes:
                missing.append(name)
            elif list(shapes[key]) != want:
                if allow_new_head and name.startswith(scope + "/" + HEAD_SCOPE):
                    self.fresh.append(var)
                    continue
                mismatched.append("{} (checkpoint {}, model {})".format(name, list(shapes[key]), want))
            else:
                self.var_map[key] = var
        if missing or mismatched:
            raise UserError(self._describe(prefix, scope, shapes, missing, mismatched))

    @staticmethod
    def _describe(prefix, scope, shapes, missing, mismatched):
        def listing(names):
            shown = ", ".join(names[:8])
            return shown + (", ... ({} more)".format(len(names) - 8) if len(names) > 8 else "")

        parts = ["checkpoint {} does not fit the model {}:".format(prefix, scope)]
        if missing:
            parts.append("{} variables missing: {}".format(len(missing), listing(missing)))
        if mismatched:
            parts.append("{} with other shapes: {}".format(len(mismatched), listing(mismatched)))
        scopes = sorted({k.split("/")[0] for k in shapes if "/" in k})
        if scope not in scopes:
            parts.append("the checkpoint's variables are under {} (is model= the right variant?)".format(
                ", ".join(s + "/" for s in scopes[:5]) or "no scope"))
        return " ".join(parts)

    def saver(self):
        """A Saver of var_map. Under a tf.distribute strategy (built in its scope) a mirrored variable has one copy
        per local device: then one Saver per copy, all restored from the same checkpoint tensors."""
        copies = {key: tf.distribute.get_strategy().experimental_local_results(var)
                  for key, var in self.var_map.items()}
        count = max([len(c) for c in copies.values()] or [1])
        if count == 1:
            return tf.compat.v1.train.Saver({key: c[0] for key, c in copies.items()}, save_relative_paths=True)
        return _EveryCopy([tf.compat.v1.train.Saver({key: c[i] for key, c in copies.items()},
                                                    save_relative_paths=True) for i in range(count)])

    def describe(self):
        text = "{} variables from {} ({} weights)".format(
            len(self.var_map), self.prefix, "EMA" if self.uses_ema else "raw")
        if self.fresh:
            text += "; new classifier {} freshly initialised (the checkpoint's has another class count)".format(
                ", ".join(v.op.name for v in self.fresh))
        return text


def resolve_weights(spec, cache_dir):
    """A checkpoint prefix for `model.pretrained` / `eval.checkpoint`: a path, or package:<variant>; checked
    readable here, before any graph is built."""
    if spec.startswith("package:"):
        prefix = ensure_imported(spec[len("package:"):], os.path.expanduser(cache_dir))
    else:
        prefix = resolve_checkpoint(spec)
    checkpoint_reader(prefix)
    return prefix


class InferenceModel(object):
    """The inference graph of model_cfg on images (batch norm on its moving statistics, no dropout or
    drop-connect) and the plan restoring its variables from checkpoint: the EMA shadows when use_ema and the
    checkpoint has them, else the raw weights.

    Build it inside the graph (before graph.finalize()), then call restore(sess). More inputs on the same
    variables: tower(images), which adds no second saver.
    """

    def __init__(self, images, model_cfg, checkpoint, use_ema=True):
        self.model_cfg = model_cfg
        self.checkpoint = checkpoint
        self.logits, self.endpoints = build_efficientnet(images, model_cfg, is_training=False)
        self.plan = WeightsPlan(checkpoint, model_variables(model_cfg.name), model_cfg.name,
                                Weights.ema if use_ema else Weights.raw)
        self._saver = self.plan.saver()

    def tower(self, images):
        """Logits of another input through the same (restored) variables."""
        logits, _ = build_efficientnet(images, self.model_cfg, is_training=False, reuse=True)
        return logits

    def restore(self, sess):
        with sess.graph.as_default():  # TF 2.x: outside a graph context, Saver.restore would run eagerly
            self._saver.restore(sess, self.checkpoint)

    def describe(self):
        return self.plan.describe()


class _EveryCopy(object):
    """Restores every local copy of mirrored variables, one Saver each."""

    def __init__(self, savers):
        self.savers = savers

    def restore(self, sess, prefix):
        for saver in self.savers:
            saver.restore(sess, prefix)
