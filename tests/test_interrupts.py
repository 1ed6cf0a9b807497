"""The fault matrix: SIGTERM / SIGINT at named moments of every mode (real signals: the process sends them to
itself when it reaches the moment named by EFFNET_EXP_SIGNAL_AT, see effnet_exp/interrupts.py), then the exit
status, the one error line, what is on disk, status.json in a sweep, and the resume to the uninterrupted result."""
import json
import os
import signal

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, run_py

ARGS = TINY + ["train.keep_checkpoint_max=2"]


def run_at(point, args, cwd, cache_dir):
    env_before = os.environ.get("EFFNET_EXP_SIGNAL_AT")
    os.environ["EFFNET_EXP_SIGNAL_AT"] = point
    try:
        return run_py(args, cwd, cache_dir)
    finally:
        if env_before is None:
            del os.environ["EFFNET_EXP_SIGNAL_AT"]
        else:
            os.environ["EFFNET_EXP_SIGNAL_AT"] = env_before


def assert_stopped(proc, signum, *phrases):
    """Exit 128 + signum, exactly one line on stderr, an `error:` one naming the signal, no traceback."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 128 + signum, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert signal.Signals(signum).name in lines[0]
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def leftovers(folder):
    """Temporary files or folders anywhere under folder (a write cut half-way)."""
    found = []
    for root, dirs, files in os.walk(str(folder)):
        found += [os.path.join(root, n) for n in dirs + files if n.endswith((".tmp", ".old"))]
    return found


def comparable(eval_json):
    record = json.load(open(str(eval_json)))
    return {k: v for k, v in record.items() if k not in ("checkpoint", "images_per_sec")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """The uninterrupted run."""
    folder = tmp_path_factory.mktemp("reference")
    proc = run_py(ARGS + ["hydra.run.dir=" + str(folder / "run")], folder, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "run"


def test_ctrl_c_in_the_final_evaluation_then_resume_gives_the_uninterrupted_result(reference, tmp_path, cache_dir):
    """Stopped during graph building, then the restore, then (Ctrl-C) the final evaluation, resumed each time:
    the same eval.json as the uninterrupted run (none of the stops came after a training step)."""
    run_dir = tmp_path / "run"
    proc = run_at("building", ARGS + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "while training", "`python run.py resume={}` continues".format(run_dir))
    assert not (run_dir / "checkpoints").exists() and not leftovers(run_dir)

    resume = ["resume=" + str(run_dir)]
    proc = run_at("restoring", resume, tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "while training")
    assert not (run_dir / "checkpoints").exists()

    proc = run_at("evaluating:SIGINT", resume, tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGINT, "while evaluating")
    assert (run_dir / "checkpoints" / "model.ckpt-4.index").exists()
    assert not (run_dir / "eval.json").exists() and not leftovers(run_dir)

    proc = run_py(resume, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(run_dir / "eval.json") == comparable(reference / "eval.json")


def test_stopped_in_a_step_then_in_a_save_resumes_to_the_last_step(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_at("training", ARGS + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "at step 1; checkpoint {} saved".format(
        run_dir / "checkpoints" / "model.ckpt-1"))

    # The signal comes while the step-2 checkpoint is written: the save completes, then the run stops.
    resume = ["resume=" + str(run_dir)]
    proc = run_at("saving", resume, tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "at step 2; checkpoint {} saved".format(
        run_dir / "checkpoints" / "model.ckpt-2"))
    assert not (run_dir / "eval.json").exists() and not leftovers(run_dir)

    proc = run_py(resume, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in open(str(run_dir / "metrics.jsonl"))]
    assert steps == [1, 2, 4] and json.load(open(str(run_dir / "eval.json")))["step"] == 4


def test_signal_during_a_periodic_evaluation_stops_with_the_checkpoint_it_evaluates(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_at("evaluating", ARGS + ["train.eval_every=2", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "at step 2; checkpoint {} saved".format(
        run_dir / "checkpoints" / "model.ckpt-2"))
    assert not (run_dir / "eval.json").exists() and not (run_dir / "checkpoints" / "best").exists()
    assert not leftovers(run_dir)


def test_second_signal_ends_at_once(tmp_path, cache_dir):
    """Two signals while a checkpoint is saved (where the first one only asks for a stop after it); mode=train."""
    run_dir = tmp_path / "run"
    proc = run_at("saving:SIGTERM:2", ARGS + ["mode=train", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    # (Had the first signal not been deferred, it would have stopped the run before the second was sent.)
    assert_stopped(proc, signal.SIGTERM, "stopped at once by a second SIGTERM")
    assert not (run_dir / "eval.json").exists()


def test_signal_before_the_run_starts(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_at("starting:SIGINT", ARGS + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGINT, "it had not started; run the same command again")


@pytest.mark.parametrize("mode, point, written", [
    ("eval", "evaluating", "eval.json"),
    ("eval", "restoring:SIGINT", "eval.json"),
    ("predict", "predicting", "predictions.json"),
    ("export", "exporting", "export"),
])
def test_inference_modes_interrupted_write_nothing(reference, tmp_path, cache_dir, mode, point, written):
    out = tmp_path / "out"
    args = ["mode=" + mode, "eval.checkpoint=" + str(reference), "hydra.run.dir=" + str(out)] + TINY
    if mode == "predict":
        image = str(tmp_path / "seven.png")
        Image.fromarray(np.random.RandomState(7).randint(0, 256, (40, 30, 3)).astype(np.uint8)).save(image)
        args.append("predict.images=[{0},{0}]".format(image))
    proc = run_at(point, args, tmp_path, cache_dir)
    signum = signal.SIGINT if point.endswith("SIGINT") else signal.SIGTERM
    assert_stopped(proc, signum, "nothing was written; run the same command again")
    assert not (out / written).exists()
    assert not leftovers(out) and not [n for n in os.listdir(str(out)) if n.startswith(".export")]


def test_sweep_interrupted_in_its_second_job(reference, tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    proc = run_at("building@2", ["-m", "mode=eval", "eval.checkpoint=" + str(reference), "eval.batch_size=64,128",
                                 "hydra.sweep.dir=" + str(sweep_dir)] + TINY[:1], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "while evaluating", "the sweep stopped after 2 job(s)")
    statuses = [json.load(open(str(sweep_dir / str(n) / "status.json")))["status"] for n in (0, 1)]
    assert statuses == ["completed", "interrupted"]
    summary = open(str(sweep_dir / "summary.md")).read()
    assert "1 completed, 1 interrupted" in summary
    assert (sweep_dir / "0" / "eval.json").exists() and not (sweep_dir / "1" / "eval.json").exists()


def test_sweep_interrupted_between_two_jobs(reference, tmp_path, cache_dir):
    sweep_dir = tmp_path / "sweep"
    proc = run_at("job_end", ["-m", "mode=eval", "eval.checkpoint=" + str(reference), "eval.batch_size=64,128",
                              "hydra.sweep.dir=" + str(sweep_dir)] + TINY[:1], tmp_path, cache_dir)
    assert_stopped(proc, signal.SIGTERM, "the sweep stopped after 1 job(s), see {}".format(sweep_dir / "summary.md"))
    assert json.load(open(str(sweep_dir / "0" / "status.json")))["status"] == "completed"
    assert not (sweep_dir / "1").exists()
    assert "1 job(s): 1 completed" in open(str(sweep_dir / "summary.md")).read()
