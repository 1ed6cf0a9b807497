"""checkpoints/best/ is crash-safe: a crash before any one of the file operations of a swap leaves a state file
naming a complete checkpoint, and the next start tidies the folder so that best.json, the state file and the
files agree. Real TensorFlow checkpoints; the crash is an exception raised by the file operation itself."""
import os
import shutil

import pytest
import tensorflow as tf

from effnet_exp.run_folder import latest_checkpoint, read_json
from effnet_exp.training import checkpoints
from effnet_exp.training.checkpoints import BestCheckpoint


class Crash(BaseException):
    pass


@pytest.fixture
def saved(tmp_path):
    """checkpoints/model.ckpt-{1,2,3} whose variable w holds the step."""
    folder = tmp_path / "checkpoints"
    graph = tf.Graph()
    with graph.as_default():
        w = tf.compat.v1.get_variable("w", initializer=0.0)
        value = tf.compat.v1.placeholder(tf.float32, [])
        assign = w.assign(value)
        saver = tf.compat.v1.train.Saver(max_to_keep=10)
    with tf.compat.v1.Session(graph=graph) as sess:
        for step in (1, 2, 3):
            sess.run(assign, {value: float(step)})
            saver.save(sess, str(folder / "model.ckpt"), global_step=step)
    return folder


def best_state(folder):
    """(step held by the checkpoint the state file names, best.json's step) of checkpoints/best."""
    prefix = latest_checkpoint(str(folder / "best"))
    assert prefix, "checkpoints/best names no complete checkpoint"
    held = int(tf.compat.v1.train.NewCheckpointReader(prefix).get_tensor("w"))
    record = read_json(str(folder / "best" / "best.json"))
    return held, record["step"] if record else None


class FileOps(object):
    """Counts the file operations of a swap; raises Crash instead of the n-th one."""

    NAMES = (("os", os, "replace"), ("os", os, "rename"), ("os", os, "remove"), ("shutil", shutil, "copy2"),
             ("shutil", shutil, "rmtree"))

    def __init__(self, monkeypatch, crash_at=None):
        self.count = 0
        self.crash_at = crash_at
        for _, module, name in self.NAMES:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def op(*args, **kwargs):
            if self.count == self.crash_at:
                raise Crash()
            self.count += 1
            return real(*args, **kwargs)
        return op


def test_a_crash_before_any_file_operation_of_a_swap_keeps_a_complete_best(saved, tmp_path, monkeypatch):
    BestCheckpoint(str(saved)).offer(str(saved / "model.ckpt-1"), 1, 0.5)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(str(saved), str(snapshot))
    with monkeypatch.context() as patch:
        ops = FileOps(patch)
        assert BestCheckpoint(str(saved)).offer(str(saved / "model.ckpt-2"), 2, 0.6)
    total = ops.count
    assert total >= 6 and best_state(saved) == (2, 2)

    for crash_at in range(total):
        shutil.rmtree(str(saved))
        shutil.copytree(str(snapshot), str(saved))
        with monkeypatch.context() as patch:
            FileOps(patch, crash_at)
            with pytest.raises(Crash):
                BestCheckpoint(str(saved)).offer(str(saved / "model.ckpt-2"), 2, 0.6)
        held, _ = best_state(saved)
        assert held in (1, 2), crash_at
        # The next start: the state file, best.json and the files agree, and nothing else is left.
        best = BestCheckpoint(str(saved))
        held, recorded = best_state(saved)
        assert held == recorded and best.top1 == {1: 0.5, 2: 0.6}[held], crash_at
        names = sorted(os.listdir(str(saved / "best")))
        assert names == sorted(["best.json", "checkpoint", "model.ckpt-{}.index".format(held),
                                "model.ckpt-{}.data-00000-of-00001".format(held)] +
                               (["model.ckpt-{}.meta".format(held)] if "model.ckpt-{}.meta".format(held) in names
                                else [])), (crash_at, names)


def test_a_worse_result_changes_nothing_and_a_better_one_replaces(saved):
    best = BestCheckpoint(str(saved))
    assert best.offer(str(saved / "model.ckpt-1"), 1, 0.5)
    assert not best.offer(str(saved / "model.ckpt-2"), 2, 0.5)
    assert best_state(saved) == (1, 1)
    assert best.offer(str(saved / "model.ckpt-3"), 3, 0.7)
    assert best_state(saved) == (3, 3)
    assert not [n for n in os.listdir(str(saved / "best")) if "ckpt-1" in n]


def test_the_same_step_offered_again_gets_its_own_name(saved):
    """A resumed run can evaluate a checkpoint of the same step again with other weights."""
    best = BestCheckpoint(str(saved))
    best.offer(str(saved / "model.ckpt-2"), 2, 0.5)
    best.offer(str(saved / "model.ckpt-2"), 2, 0.6)
    assert latest_checkpoint(str(saved / "best")).endswith("model.ckpt-2.1")
    assert read_json(str(saved / "best" / "best.json"))["top1"] == 0.6


def test_the_swap_folders_of_earlier_versions_are_recovered(saved):
    """Before this layout, best/ was swapped with best.old/ by two renames: a crash between them left no best/."""
    best = BestCheckpoint(str(saved))
    best.offer(str(saved / "model.ckpt-1"), 1, 0.5)
    os.rename(str(saved / "best"), str(saved / "best.old"))
    os.makedirs(str(saved / "best.tmp"))
    assert BestCheckpoint(str(saved)).top1 == 0.5
    assert best_state(saved) == (1, 1)
    assert not os.path.exists(str(saved / "best.old")) and not os.path.exists(str(saved / "best.tmp"))


def test_a_best_folder_without_a_record_is_removed(saved):
    os.makedirs(str(saved / "best"))
    shutil.copy2(str(saved / "model.ckpt-1.index"), str(saved / "best" / "model.ckpt-1.index.tmp"))
    assert BestCheckpoint(str(saved)).top1 is None
    assert not os.path.exists(str(saved / "best"))
    assert checkpoints.recover_best(str(saved / "best")) is None
