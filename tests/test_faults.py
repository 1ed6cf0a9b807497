"""Faults a long run meets, really caused: NaN losses, SIGTERM, and periodic evaluation with a kept best."""
import json
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from conftest import RUN_PY, TINY, run_py

DIVERGE = ["optimizer=sgd_nesterov", "optimizer.lr=1e30", "train.log_every=1", "train.checkpoint_every=1",
           "train.steps=6"]


def test_nan_loss_stops_with_step_and_last_good_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + DIVERGE + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 2
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "loss became nan at step 2" in line, line
    kept = str(run_dir / "checkpoints" / "model.ckpt-1")
    assert kept in line
    assert tf.compat.v1.train.latest_checkpoint(str(run_dir / "checkpoints")) == kept
    assert not (run_dir / "checkpoints" / "model.ckpt-2.index").exists()
    assert not (run_dir / "eval.json").exists()


def test_nan_skip_policy_skips_then_stops_after_k(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + DIVERGE + ["train.nonfinite_policy=skip", "train.max_nonfinite_steps=3",
                                    "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 2
    assert "not finite for 3 steps in a row, up to step 4" in proc.stderr
    assert "update skipped" in open(str(run_dir / "run.log")).read()
    # Skipped updates leave the weights and batch-norm statistics as they were: still finite.
    reader = tf.compat.v1.train.NewCheckpointReader(str(run_dir / "checkpoints" / "model.ckpt-3"))
    for name in ("efficientnet-lite0/stem/tpu_batch_normalization/moving_mean",
                 "efficientnet-lite0/stem/conv2d/kernel"):
        assert (abs(reader.get_tensor(name)) < float("inf")).all(), name


def test_sigterm_saves_then_the_same_command_finishes(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = TINY + ["train.steps=60", "train.log_every=1", "train.checkpoint_every=1000",
                   "hydra.run.dir=" + str(run_dir)]
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, RUN_PY] + args, cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - signalled < 30
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err
    stopped_at = [json.loads(l)["step"] for l in metrics.read_text().splitlines()][-1]
    assert 3 <= stopped_at < 60
    prefix = tf.compat.v1.train.latest_checkpoint(str(run_dir / "checkpoints"))
    assert prefix.endswith("model.ckpt-%d" % stopped_at)

    again = run_py(args, tmp_path, cache_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines()]
    assert steps[-1] == 60 and steps == sorted(steps) and len(steps) == len(set(steps))
    assert json.load(open(str(run_dir / "eval.json")))["step"] == 60


def test_periodic_eval_keeps_the_best_checkpoint(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["train.steps=4", "train.eval_every=2", "train.keep_checkpoint_max=1",
                          "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(l) for l in open(str(run_dir / "metrics.jsonl"))]
    evals = [r for r in records if "eval_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    best = json.load(open(str(run_dir / "checkpoints" / "best" / "best.json")))
    assert best["top1"] == max(r["eval_top1"] for r in evals)
    assert evals[-1]["best_eval_top1"] == best["top1"]
    # Rotation (keep 1) removed model.ckpt-2 from checkpoints/, never the best copy.
    assert not (run_dir / "checkpoints" / "model.ckpt-2.index").exists()
    assert (run_dir / "checkpoints" / "best" / (best["checkpoint"] + ".index")).exists()
    out = tmp_path / "eval_best"
    proc = run_py(["mode=eval", "eval.checkpoint=" + str(run_dir / "checkpoints" / "best"),
                   "hydra.run.dir=" + str(out)] + TINY, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(json.load(open(str(out / "eval.json")))["top1"] - best["top1"]) < 1e-9


def test_resume_uses_the_saved_config_with_new_overrides(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["mode=train", "train.steps=2", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Only the new override: batch size, image size and mode come back from the run's saved config.
    proc = run_py(["resume=" + str(run_dir), "train.steps=4"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = open(str(run_dir / "run.log")).read()
    assert "overrides applied on top: train.steps=4" in log_text and "resumed from" in log_text
    steps = [json.loads(l)["step"] for l in open(str(run_dir / "metrics.jsonl"))]
    assert steps == [2, 4]
    assert not (run_dir / "eval.json").exists()  # still mode=train, as saved
    import yaml
    saved = yaml.safe_load(open(str(run_dir / ".hydra" / "config.yaml")))
    assert saved["train"]["steps"] == 4 and saved["train"]["batch_size"] == 8 and saved["model"]["image_size"] == 32

    proc = run_py(["resume=" + str(run_dir), "model=efficientnet_b0"], tmp_path, cache_dir)
    assert proc.returncode == 2 and "model=efficientnet_b0 cannot change it" in proc.stderr
    proc = run_py(["resume=" + str(run_dir), "optimizer.lr=abc"], tmp_path, cache_dir)
    assert proc.returncode != 0 and "optimizer.lr" in proc.stderr
    proc = run_py(["resume=" + str(tmp_path / "nowhere")], tmp_path, cache_dir)
    assert proc.returncode != 0 and "no such run folder" in proc.stderr
    assert not (tmp_path / "nowhere").exists()
