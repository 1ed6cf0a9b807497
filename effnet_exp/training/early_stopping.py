"""train.early_stopping: when to stop, decided from the eval top-1 of the train.eval_every evaluations only.

The state is a function of the chief's eval records in metrics.jsonl: a resumed run replays those up to its
checkpoint's step, and a process other than the chief (which does not evaluate) reads each one as the chief
appends it; so every process of a job, and a resumed run, decide the same. No TensorFlow here.
"""
import json
import os
import time

from effnet_exp import run_folder
from effnet_exp.errors import UserError
from effnet_exp.reporting.files import split_metrics

POLL_SECONDS = 0.5


class EarlyStopping(object):
    """Counts the evaluations in a row whose top-1 is not more than min_delta above the reference, the top-1 of
    the last evaluation that was (Keras's rule: a slow creep below min_delta per evaluation does not reset it)."""

    def __init__(self, cfg):
        self.patience = cfg.patience or 0
        self.min_delta = cfg.min_delta
        self.reference = None
        self.stale = 0

    @property
    def enabled(self):
        return self.patience > 0

    @property
    def stopped(self):
        return self.enabled and self.stale >= self.patience

    def note(self, top1):
        """Counts one evaluation; returns whether training stops here."""
        if self.reference is None or top1 - self.min_delta > self.reference:
            self.reference, self.stale = top1, 0
        else:
            self.stale += 1
        return self.stopped

    def replay(self, records, until_step):
        """Notes the eval records of metrics.jsonl up to until_step (the step a resumed run starts from)."""
        _, evals = split_metrics(records)
        for record in evals:
            if record["step"] <= until_step:
                self.note(record["eval_top1"])
        return self

    def describe(self):
        so_far = "; {} so far (reference top-1 {:.4f})".format(_evaluations(self.stale), self.reference) \
            if self.reference is not None else ""
        return "stop after {} in a row without an eval top-1 improvement > {:g}{}".format(
            _evaluations(self.patience), self.min_delta, so_far)

    def reason(self):
        return "no eval top-1 improvement > {:g} (train.early_stopping.min_delta) in {} in a row " \
               "(train.early_stopping.patience={})".format(self.min_delta, _evaluations(self.stale), self.patience)

    def record(self, step, best):
        """The metrics.jsonl record of the stop at step; best: the checkpoints/best record (best.json)."""
        return {"step": step, "early_stop": True, "reason": self.reason(), "best_step": best["step"],
                "best_eval_top1": best["top1"],
                "best_checkpoint": os.path.join(run_folder.CHECKPOINT_DIR, run_folder.BEST_DIR, best["checkpoint"])}


def _evaluations(count):
    return "{} evaluation{}".format(count, "" if count == 1 else "s")


def best_record(run_dir):
    """The checkpoints/best record (step, top1, checkpoint name) as the chief last wrote it."""
    path = os.path.join(run_folder.checkpoint_dir(run_dir), run_folder.BEST_DIR, run_folder.BEST_RECORD)
    record = run_folder.read_json(path)
    if not record:
        raise UserError("early stopping: {} is missing or unreadable, so the best checkpoint is not known".format(
            path))
    return record


class ChiefEvaluations(object):
    """The eval top-1 results as the chief appends them to its metrics.jsonl, for the processes that wait for
    them. Reads only what was added since the last look (the chief appends whole lines); starts over when the
    chief rewrote the file (a resumed chief drops the records after its checkpoint)."""

    def __init__(self, path):
        self.path = path
        self.file_id = None
        self.offset = 0
        self.top1 = {}

    def wait(self, step, interrupted):
        """The chief's eval top-1 at step; None as soon as interrupted() is true."""
        while step not in self.top1:
            if interrupted():
                return None
            if not self._read_new():
                time.sleep(POLL_SECONDS)
        return self.top1[step]

    def _read_new(self):
        """Takes the complete lines added since the last call; returns whether there were any."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                if (stat.st_dev, stat.st_ino) != self.file_id:
                    self.file_id, self.offset, self.top1 = (stat.st_dev, stat.st_ino), 0, {}
                f.seek(self.offset)
                added = f.read()
        except (IOError, OSError):
            return False
        complete = added[:added.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            record = _parsed(line)
            if "eval_top1" in record:
                self.top1[record["step"]] = record["eval_top1"]
        return bool(complete)


def _parsed(line):
    try:
        return json.loads(line)
    except ValueError:
        return {}  # blank, or torn by a kill
