"""Finding checkpoints: a prefix, a folder with a `checkpoint` state file, or a run folder."""
import os

import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.run_files import CHECKPOINT_DIR


def latest_in(folder):
    """The newest checkpoint prefix in folder (or None) according to its `checkpoint` state file."""
    if not os.path.isfile(os.path.join(folder, "checkpoint")):
        return None
    prefix = tf.train.latest_checkpoint(folder)
    return prefix if prefix and _exists(prefix) else None


def _exists(prefix):
    try:
        return tf.compat.v1.train.checkpoint_exists(prefix)
    except tf.errors.OpError:  # TF 1.15 raises instead of answering False for a missing folder
        return False


def resolve_checkpoint(path):
    """A checkpoint prefix from a prefix, a checkpoint folder or a run folder; UserError naming the path."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        for folder in (os.path.join(path, CHECKPOINT_DIR), path):
            prefix = latest_in(folder)
            if prefix:
                return prefix
        raise UserError("no checkpoint found in folder {} (looked for a `checkpoint` state file in it and "
                        "in its {}/ sub-folder)".format(path, CHECKPOINT_DIR))
    if _exists(path):
        return path
    raise UserError("checkpoint {} does not exist (expected a prefix with {}.index beside it, "
                    "a checkpoint folder or a run folder)".format(path, os.path.basename(path)))


def checkpoint_step(prefix):
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    if reader.has_tensor("global_step"):
        return int(reader.get_tensor("global_step"))
    tail = prefix.rsplit("-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None
