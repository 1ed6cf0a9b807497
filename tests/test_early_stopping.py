"""train.early_stopping: the rule on hand-made sequences of eval top-1, how other processes follow the chief's
evaluations (real files), the config errors, and real runs of run.py.

The runs train with optimizer.lr=0 and train.freeze_bn=true: the weights and batch-norm statistics never change,
so every evaluation gives the same top-1 (each run checks that), and the stop step follows by hand from
train.eval_every and train.early_stopping.patience. Three runs per stack: a two-job sweep in mode=train (one job
stops, one does not), a resume of the job that stopped, and a train_eval job of two Ascend ranks (FAKE
npu_bridge, see tests/test_ascend.py) in which only rank 0 evaluates.
"""
import csv
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf

from conftest import REPO, TINY, run_py
from effnet_exp.errors import UserError
from effnet_exp.run_folder import append_jsonl, atomic_write_text
from effnet_exp.training.config import EarlyStoppingConfig
from effnet_exp.training.early_stopping import ChiefEvaluations, EarlyStopping
from effnet_exp.validate import validate
from factory import run_config
from test_ascend import fake_rank_env, write_rank_table


# --- the rule ------------------------------------------------------------------------------------------------

# (top-1 of each evaluation, min_delta, patience, index of the evaluation that stops training or None)
SEQUENCES = [
    # Equal is no improvement: the second and third evaluations count.
    ([0.5, 0.5, 0.5, 0.9], 0.0, 2, 2),
    ([0.5, 0.4, 0.6, 0.6, 0.55], 0.0, 2, 4),
    # min_delta: +0.005 is not > 0.01, so 0.505 counts and does not become the reference; 0.52 beats the
    # reference 0.5 by 0.02, resets, and 0.529 (+0.009 over 0.52) counts again.
    ([0.5, 0.505, 0.52, 0.529, 0.525, 0.6], 0.01, 2, 4),
    ([0.5, 0.505, 0.509], 0.01, 2, 2),  # a slow creep below min_delta per evaluation still stops
    ([0.5, 0.3, 0.2, 0.1], 0.0, 4, None),  # fewer evaluations than the patience
    ([0.5, 0.5, 0.5, 0.5], 0.0, None, None),  # off
    ([0.5, 0.5, 0.5, 0.5], 0.0, 0, None),  # off
]


def stop_index(stopping, top1s):
    for index, top1 in enumerate(top1s):
        if stopping.note(top1):
            return index
    return None


@pytest.mark.parametrize("top1s,min_delta,patience,expected", SEQUENCES)
def test_the_rule(top1s, min_delta, patience, expected):
    stopping = EarlyStopping(EarlyStoppingConfig(patience=patience, min_delta=min_delta))
    assert stop_index(stopping, top1s) == expected


def metrics_records(top1s):
    """metrics.jsonl records of a run evaluated every 2 steps: training records between the evaluations, and
    the first evaluation logged twice (a resumed run logs again what it trains again: the later record counts)."""
    records = [{"step": 1, "loss": 1.0, "top1": 0.1}, {"step": 2, "eval_top1": -1.0}]
    for n, top1 in enumerate(top1s, 1):
        records += [{"step": 2 * n - 1, "loss": 1.0, "top1": 0.1}, {"step": 2 * n, "eval_top1": top1}]
    return records


@pytest.mark.parametrize("top1s,min_delta,patience,expected", SEQUENCES[:5])
def test_a_resumed_run_decides_as_an_uninterrupted_one(top1s, min_delta, patience, expected):
    """Replaying the records up to any checkpoint step of the run (none after its stop), then going on, stops at
    the same evaluation; a replay that includes the stop finds the run stopped."""
    records = metrics_records(top1s)
    for done in range(len(top1s) + 1 if expected is None else expected + 2):
        stopping = EarlyStopping(EarlyStoppingConfig(patience=patience, min_delta=min_delta))
        stopping.replay(records, until_step=2 * done)
        assert stopping.stopped == (expected is not None and done > expected), done
        if not stopping.stopped:
            later = stop_index(stopping, top1s[done:])
            assert (None if later is None else done + later) == expected, done


# --- other processes follow the chief's evaluations ----------------------------------------------------------

def append_text(path, text):
    with open(path, "a") as f:
        f.write(text)


def within(seconds):
    """An `interrupted` callable that turns true after seconds (a test that would hang fails instead)."""
    deadline = time.time() + seconds
    return lambda: time.time() > deadline


def test_other_processes_read_each_evaluation_as_the_chief_appends_it(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    evals = ChiefEvaluations(path)
    threading.Timer(0.3, append_jsonl, (path, {"step": 2, "eval_top1": 0.25})).start()  # no file yet
    assert evals.wait(2, within(10)) == 0.25
    append_jsonl(path, {"step": 3, "loss": 1.0, "top1": 0.5})
    append_text(path, '{"step": 4, "eval_top1": 0.')  # a line being written: not taken half-way
    threading.Timer(0.3, append_text, (path, '75}\n')).start()
    assert evals.wait(4, within(10)) == 0.75
    # A resumed chief rewrites its file (shorter: without the records after its checkpoint), then appends.
    atomic_write_text(path, json.dumps({"step": 2, "eval_top1": 0.25}) + "\n")
    threading.Timer(0.3, append_jsonl, (path, {"step": 6, "eval_top1": 0.5})).start()
    assert evals.wait(6, within(10)) == 0.5
    assert evals.wait(8, within(0.5)) is None  # a signal while waiting


# --- config errors ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,names", [
    (["train.early_stopping.patience=3"], ["train.early_stopping.patience=3", "train.eval_every"]),
    (["train.eval_every=2", "train.early_stopping.patience=-1"], ["train.early_stopping.patience=-1"]),
    (["train.eval_every=2", "train.early_stopping.patience=2", "train.early_stopping.min_delta=-0.01"],
     ["train.early_stopping.min_delta=-0.01"]),
])
def test_config_errors_name_the_key_and_value(overrides, names):
    with pytest.raises(UserError) as caught:
        validate(run_config(*overrides))
    for name in names:
        assert name in str(caught.value)


def test_off_needs_no_eval_every():
    for overrides in ([], ["train.early_stopping.patience=0"], ["train.early_stopping.patience=null"]):
        validate(run_config(*overrides))


# --- real runs ---------------------------------------------------------------------------------------------------

# 6 steps, evaluated every 2; checkpoints only where an evaluation or the end needs one. CutMix on, too: issue 18's
# train.cutmix_alpha=1.0 end to end (with lr=0 it changes no weight, so the stop steps stay as designed).
CONSTANT = [a for a in TINY if not a.startswith(("train.steps=", "train.checkpoint_every="))] + [
    "train.steps=6", "train.eval_every=2", "train.checkpoint_every=100", "optimizer.lr=0", "train.freeze_bn=true",
    "train.cutmix_alpha=1.0"]
STOP_STEP = 4  # patience 1: the evaluation at step 2 is the best, the one at step 4 does not improve on it


def records(folder):
    with open(os.path.join(str(folder), "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path):
    with open(str(path)) as f:
        return json.load(f)


def eval_records(folder):
    return [r for r in records(folder) if "eval_top1" in r]


def latest_step(run_dir):
    prefix = tf.compat.v1.train.latest_checkpoint(str(run_dir / "checkpoints"))
    return int(prefix.rsplit("-", 1)[1])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """mode=train, patience 1 (stops at step 4) and 3 (as many as its evaluations: runs to step 6)."""
    cwd = tmp_path_factory.mktemp("early_stopping")
    sweep_dir = cwd / "sweep"
    proc = run_py(["-m", "mode=train", "train.early_stopping.patience=1,3", "hydra.sweep.dir=" + str(sweep_dir)] +
                  CONSTANT, cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, sweep_dir


def test_a_job_without_improvement_stops_after_patience_evaluations(sweep):
    _, sweep_dir = sweep
    job = sweep_dir / "0"
    evals = eval_records(job)
    assert [r["step"] for r in evals] == [2, STOP_STEP]
    assert len({r["eval_top1"] for r in evals}) == 1  # the design: lr=0, frozen batch norm
    best_top1 = evals[0]["eval_top1"]
    # Nothing trained after the stop; the last checkpoint is the stop step's.
    assert max(r["step"] for r in records(job)) == STOP_STEP and latest_step(job) == STOP_STEP
    (stop,) = [r for r in records(job) if r.get("early_stop")]
    assert (stop["step"], stop["best_step"], stop["best_eval_top1"]) == (STOP_STEP, 2, best_top1)
    assert "> 0 (train.early_stopping.min_delta) in 1 evaluation in a row" in stop["reason"]
    log_text = (job / "run.log").read_text()
    assert "stopped early at step 4 of 6: no eval top-1 improvement > 0" in log_text
    assert "the best checkpoint is step 2's (eval top1 {:.4f})".format(best_top1) in log_text
    assert "mixing each replica's batch with itself reversed: CutMix with lambda ~ Beta(1, 1)" in log_text
    # mode=train evaluated the best checkpoint once more for eval.json, and returned its top-1 to the sweeper.
    best = read_json(job / "checkpoints" / "best" / "best.json")
    final = read_json(job / "eval.json")
    assert final["checkpoint"] == str(job / "checkpoints" / "best" / best["checkpoint"]) and best["step"] == 2
    assert final["best_checkpoint"] is True and final["step"] == 2 and final["early_stop"]["step"] == STOP_STEP
    assert final["top1"] == pytest.approx(best_top1, abs=1e-9)
    assert read_json(job / "status.json")["result"] == final["top1"]


def test_a_job_whose_patience_is_not_reached_trains_to_the_end(sweep):
    _, sweep_dir = sweep
    job = sweep_dir / "1"
    evals = eval_records(job)
    assert [r["step"] for r in evals] == [2, 4, 6] and len({r["eval_top1"] for r in evals}) == 1
    assert not [r for r in records(job) if r.get("early_stop")] and latest_step(job) == 6
    assert "stopped early" not in (job / "run.log").read_text()
    final = read_json(job / "eval.json")
    assert final["step"] == 6 and "early_stop" not in final and "best_checkpoint" not in final
    assert read_json(job / "status.json")["result"] == evals[-1]["eval_top1"]


def test_the_sweep_summary_says_which_job_stopped_early_and_where(sweep):
    _, sweep_dir = sweep
    with open(str(sweep_dir / "summary.csv")) as f:
        rows = {r["folder"]: r for r in csv.DictReader(f)}
    assert (rows["0"]["stopped_early"], rows["0"]["steps"]) == (str(STOP_STEP), str(STOP_STEP))
    assert float(rows["0"]["top1"]) == pytest.approx(read_json(sweep_dir / "0" / "eval.json")["top1"], abs=1e-6)
    assert (rows["1"]["stopped_early"], rows["1"]["steps"]) == ("", "6")
    md = (sweep_dir / "summary.md").read_text()
    assert "| `train.early_stopping.patience=1` | completed, stopped early at step 4 |" in md
    assert "| `train.early_stopping.patience=3` | completed |" in md
    assert "A job that stopped early (`train.early_stopping`) has the top-1 of its best checkpoint" in md


def test_resuming_a_job_that_stopped_early_trains_no_further(sweep, cache_dir):
    """The patience counter comes back from metrics.jsonl: the resumed job knows it already stopped."""
    cwd, sweep_dir = sweep
    job = sweep_dir / "0"
    before = records(job)
    proc = run_py(["resume=" + str(job)], cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (job / "run.log").read_text()
    assert "this run already stopped early at step 4: no eval top-1 improvement > 0" in log_text
    assert log_text.count("training efficientnet-lite0 for 6 steps") == 1  # the first run's only
    assert records(job) == before and latest_step(job) == STOP_STEP
    status, final = read_json(job / "status.json"), read_json(job / "eval.json")
    assert status["runs"] == 2 and status["status"] == "completed"
    assert final["best_checkpoint"] is True and final["step"] == 2 and status["result"] == final["top1"]


def test_every_ascend_rank_stops_at_the_chiefs_step(tmp_path, cache_dir):
    """FAKE npu_bridge, 2 ranks through the launcher, mode=train_eval, patience 1: rank 0 evaluates at steps 2 and
    4 and stops at 4. The fake ranks do not wait for each other in training, so rank 1 would run to step 6 if it
    did not wait for rank 0's evaluations and decide from them."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=fake_rank_env(tmp_path, 0)["PYTHONPATH"])
    proc = subprocess.run([sys.executable, "-m", "effnet_exp.tools.launch_ascend", "--devices", "2", "--rank-table",
                           write_rank_table(tmp_path), "--run-dir", str(run_dir), "--"] + CONSTANT +
                          ["device=ascend", "model.pretrained=null", "mode=train_eval",
                           "train.early_stopping.patience=1"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chief, other = records(run_dir), records(run_dir / "rank_1")
    evals = eval_records(run_dir)
    assert [r["step"] for r in evals] == [2, 4] and evals[0]["eval_top1"] == evals[1]["eval_top1"]
    for rank in (chief, other):
        assert max(r["step"] for r in rank) == 4
        (stop,) = [r for r in rank if r.get("early_stop")]
        assert (stop["step"], stop["best_step"]) == (4, 2)
    rank_log = (run_dir / "rank_1" / "run.log").read_text()
    for step in (2, 4):
        assert "step {} eval top1 {:.4f} (the chief's)".format(step, evals[0]["eval_top1"]) in rank_log
    assert "stopped early at step 4 of 6" in rank_log
    final = read_json(run_dir / "eval.json")
    assert final["best_checkpoint"] is True and final["step"] == 2
    assert "eval top1 {:.4f} [95% CI {:.4f}, {:.4f}] balanced accuracy {:.4f} (the best checkpoint, step 2; " \
        "stopped early at step 4)".format(final["top1"], final["top1_ci95"][0], final["top1_ci95"][1],
                                          final["balanced_accuracy"]) in (run_dir / "logs" / "rank_0.log").read_text()
    assert not (run_dir / "rank_1" / "eval.json").exists()
