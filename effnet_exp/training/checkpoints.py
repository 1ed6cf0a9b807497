"""Saving and keeping checkpoints, and reading their step (finding them: effnet_exp/run_folder.py)."""
import json
import os
import shutil

import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.model.restore import checkpoint_reader
from effnet_exp.run_folder import BEST_DIR, latest_checkpoint


def checkpoint_step(prefix):
    """The checkpoint's global step (else the -N of its name); UserError naming an unreadable checkpoint."""
    reader = checkpoint_reader(prefix)
    if reader.has_tensor("global_step"):
        return int(reader.get_tensor("global_step"))
    tail = prefix.rsplit("-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else None


def save_checkpoint(saver, sess, prefix, step, previous):
    """saver.save with a clear error on a full disk or a read-only folder; the previous checkpoint survives
    (TF writes the data under a temporary name and updates the `checkpoint` state file last)."""
    try:
        return saver.save(sess, prefix, global_step=step)
    except (tf.errors.OpError, IOError, OSError) as err:
        detail = getattr(err, "message", None) or getattr(err, "strerror", None) or str(err)
        # TF names the new checkpoint in the state file once its data and index are written, before its
        # .meta graph: the state file, not `previous`, says which complete checkpoint a resume would use.
        latest = latest_checkpoint(os.path.dirname(prefix)) or previous
        kept = "the previous checkpoint {} is intact".format(latest) if latest else "no earlier checkpoint"
        raise UserError("cannot write checkpoint {}-{} in {}: {}; {}".format(
            prefix, step, os.path.dirname(prefix), detail.strip().splitlines()[0], kept))


class BestCheckpoint(object):
    """checkpoints/best/: a copy of the checkpoint with the best eval top-1, outside the rotation."""

    def __init__(self, checkpoint_dir):
        self.folder = os.path.join(checkpoint_dir, BEST_DIR)
        self.record_path = os.path.join(self.folder, "best.json")
        self.top1 = None
        if os.path.isfile(self.record_path):
            with open(self.record_path) as f:
                self.top1 = json.load(f)["top1"]

    def offer(self, prefix, step, top1):
        """Keeps prefix if its top-1 beats the best so far; returns whether it did."""
        if self.top1 is not None and top1 <= self.top1:
            return False
        staging = self.folder + ".tmp"
        if os.path.isdir(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
        name = os.path.basename(prefix)
        for path in tf.io.gfile.glob(prefix + ".*"):
            shutil.copy2(path, os.path.join(staging, os.path.basename(path)))
        with open(os.path.join(staging, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "{0}"\nall_model_checkpoint_paths: "{0}"\n'.format(name))
        with open(os.path.join(staging, "best.json"), "w") as f:
            json.dump({"step": step, "top1": top1, "checkpoint": name}, f)
        # Swap the folders: at every moment one complete best checkpoint exists on disk.
        old = self.folder + ".old"
        if os.path.isdir(self.folder):
            os.rename(self.folder, old)
        os.rename(staging, self.folder)
        if os.path.isdir(old):
            shutil.rmtree(old)
        self.top1 = top1
        return True
