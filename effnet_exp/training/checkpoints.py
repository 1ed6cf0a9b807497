"""Saving and keeping checkpoints, and reading their step (finding them: effnet_exp/run_folder.py)."""
import os
import shutil

import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.model.restore import checkpoint_reader
from effnet_exp.run_folder import (BEST_DIR, BEST_RECORD, atomic_write_json, atomic_write_text, checkpoint_exists,
                                   latest_checkpoint, read_json)


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


def keep_rotating(saver, checkpoint_dir):
    """A new Saver (a resumed run, the next progressive stage) takes over the rotation of the checkpoints already in
    checkpoint_dir, so that train.keep_checkpoint_max counts them too."""
    state = tf.compat.v1.train.get_checkpoint_state(checkpoint_dir)
    if state and state.all_model_checkpoint_paths:
        saver.recover_last_checkpoints([os.path.join(checkpoint_dir, os.path.basename(p))
                                        for p in state.all_model_checkpoint_paths])


class BestCheckpoint(object):
    """checkpoints/best/: a copy of the checkpoint with the best eval top-1, outside the rotation.

    Crash-safe: the new copy is written beside the old one, best.json (the record) and the `checkpoint` state
    file then name it, and only then are the old files removed; so at every instant the state file names a
    complete checkpoint. A crash in between is tidied up by the next start (recover).
    """

    def __init__(self, checkpoint_dir):
        self.folder = os.path.join(checkpoint_dir, BEST_DIR)
        self.record_path = os.path.join(self.folder, BEST_RECORD)
        self.top1 = None
        record = recover_best(self.folder)
        if record:
            self.top1 = record["top1"]

    def offer(self, prefix, step, top1):
        """Keeps prefix if its top-1 beats the best so far; returns whether it did."""
        if self.top1 is not None and top1 <= self.top1:
            return False
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
        name = _free_name(self.folder, os.path.basename(prefix))
        for path in tf.io.gfile.glob(prefix + ".*"):
            target = os.path.join(self.folder, name + os.path.basename(path)[len(os.path.basename(prefix)):])
            shutil.copy2(path, target + ".tmp")
            os.replace(target + ".tmp", target)
        atomic_write_json(self.record_path, {"step": step, "top1": top1, "checkpoint": name})
        _write_state(self.folder, name)
        _remove_all_but(self.folder, name)
        self.top1 = top1
        return True


def recover_best(folder):
    """Tidies checkpoints/best/ after a crash; returns its best.json record, or None."""
    staging, old = folder + ".tmp", folder + ".old"  # the folders an earlier version swapped
    if not os.path.isdir(folder) and os.path.isdir(old):
        os.rename(old, folder)
    for leftover in (staging, old):
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
    record = read_json(os.path.join(folder, BEST_RECORD))
    if not record or not checkpoint_exists(os.path.join(folder, record["checkpoint"])):
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # never named a complete copy
        return None
    if latest_checkpoint(folder) != os.path.join(folder, record["checkpoint"]):
        _write_state(folder, record["checkpoint"])
    _remove_all_but(folder, record["checkpoint"])
    return record


def _belongs(entry, name):
    """Whether file entry is part of checkpoint name (its index, data shards or graph)."""
    rest = entry[len(name):] if entry.startswith(name) else None
    return rest in (".index", ".meta") or bool(rest and rest.startswith(".data-") and not rest.endswith(".tmp"))


def _free_name(folder, name):
    """name, or name.1, name.2, ... if a checkpoint of that name is already in folder."""
    candidate, n = name, 0
    while any(_belongs(entry, candidate) for entry in os.listdir(folder)):
        n += 1
        candidate = "{}.{}".format(name, n)
    return candidate


def _write_state(folder, name):
    atomic_write_text(os.path.join(folder, "checkpoint"),
                      'model_checkpoint_path: "{0}"\nall_model_checkpoint_paths: "{0}"\n'.format(name))


def _remove_all_but(folder, name):
    for entry in os.listdir(folder):
        if entry not in (BEST_RECORD, "checkpoint") and not _belongs(entry, name):
            os.remove(os.path.join(folder, entry))
