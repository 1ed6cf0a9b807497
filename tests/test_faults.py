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


# --------------------------------------------------------------------------- crashes and a read-only disk

# No dropout or drop-connect: their masks come from stateful random ops, which a resumed process draws afresh
# (README, "When things go wrong"); everything else about a resumed run repeats the uninterrupted one.
RESUMABLE = TINY + ["optimizer=sgd_nesterov", "train.steps=12", "train.log_every=1", "train.checkpoint_every=4",
                    "seed=3", "model.dropout_rate=0", "model.survival_prob=1.0"]


def _steps(run_dir):
    return [json.loads(l)["step"] for l in open(str(run_dir / "metrics.jsonl")) if "loss" in json.loads(l)]


def _start(args, tmp_path, cache_dir):
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, RUN_PY] + args, cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def _wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, (what, proc.communicate())
        assert time.time() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def _readable(prefix):
    """Every tensor of the checkpoint reads back (a torn .data or .index file would fail here)."""
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)
    return True


def test_sigkill_mid_run_then_resume_ends_like_an_uninterrupted_run(tmp_path, cache_dir):
    straight = tmp_path / "straight"
    proc = run_py(RESUMABLE + ["hydra.run.dir=" + str(straight)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    args = RESUMABLE + ["hydra.run.dir=" + str(killed)]
    proc = _start(args, tmp_path, cache_dir)
    metrics = killed / "metrics.jsonl"
    # Past the checkpoint at step 4, before the one at step 8 is certain: steps 5.. are lost.
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 5, proc, "step 5")
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    lost_from = _steps(killed)[-1]
    latest = tf.compat.v1.train.latest_checkpoint(str(killed / "checkpoints"))
    kept = int(latest.rsplit("-", 1)[1])
    assert kept % 4 == 0 and 4 <= kept <= lost_from < 12

    proc = run_py(args, tmp_path, cache_dir)  # the same command carries on
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (killed / "run.log").read_text()
    assert "resumed from " + latest in log_text
    assert "the input stream continues after %d steps" % kept in log_text
    # metrics.jsonl: the lost steps logged once, as in the uninterrupted run; the same final step.
    assert _steps(killed) == _steps(straight) == list(range(1, 13))
    final = tf.compat.v1.train.latest_checkpoint(str(killed / "checkpoints"))
    assert final.endswith("model.ckpt-12") and _readable(final)
    # Same data order, crops and updates: the same losses and final evaluation, to float tolerance.
    def losses(run_dir):
        return [json.loads(l)["loss"] for l in open(str(run_dir / "metrics.jsonl")) if "loss" in json.loads(l)]
    assert losses(killed)[:kept] == losses(straight)[:kept]
    for resumed, uninterrupted in zip(losses(killed)[kept:], losses(straight)[kept:]):
        assert abs(resumed - uninterrupted) <= 1e-3 * max(1.0, abs(uninterrupted)), (resumed, uninterrupted)
    eval_killed = json.load(open(str(killed / "eval.json")))
    eval_straight = json.load(open(str(straight / "eval.json")))
    assert eval_killed["step"] == eval_straight["step"] == 12
    assert abs(eval_killed["top1"] - eval_straight["top1"]) <= 1e-6


# Dies where a crash hurts most: the new checkpoint's files written, then torn, and the process killed
# before the `checkpoint` state file names it. run.py itself runs unchanged under this wrapper.
KILL_IN_SAVE = '''
import glob, os, runpy, signal, sys
from effnet_exp.training import trainer
real_save = trainer.save_checkpoint

def save_then_die(saver, sess, prefix, step, previous):
    if step != {step}:
        return real_save(saver, sess, prefix, step, previous)
    saver.save(sess, prefix, global_step=step, write_state=False)
    for path in glob.glob("%s-%d.data-*" % (prefix, step)):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    os.kill(os.getpid(), signal.SIGKILL)

trainer.save_checkpoint = save_then_die
sys.argv = [{run_py!r}] + sys.argv[1:]
runpy.run_path({run_py!r}, run_name="__main__")
'''


def test_kill_during_a_checkpoint_save_leaves_the_previous_one_usable(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = TINY + ["train.steps=6", "hydra.run.dir=" + str(run_dir)]  # checkpoints at 2, 4, 6
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE.format(step=4, run_py=RUN_PY))
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(RUN_PY), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(wrapper)] + args, cwd=str(tmp_path), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "model.ckpt-4.index").exists()  # the torn one is on disk...
    previous = tf.compat.v1.train.latest_checkpoint(str(checkpoints))
    assert previous.endswith("model.ckpt-2") and _readable(previous)  # ...but the state file names this one

    proc = run_py(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from " + previous in (run_dir / "run.log").read_text()
    final = tf.compat.v1.train.latest_checkpoint(str(checkpoints))
    assert final.endswith("model.ckpt-6") and _readable(final)
    assert _readable(str(checkpoints / "model.ckpt-4"))  # saved again, whole this time
    assert json.load(open(str(run_dir / "eval.json")))["step"] == 6


def _make_read_only(path):
    """Really read-only, also for root (who ignores permission bits): the immutable attribute."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], stderr=subprocess.PIPE).returncode != 0:
            return False
    else:
        os.chmod(str(path), 0o555)
    try:
        open(os.path.join(str(path), ".probe"), "w").close()
    except (IOError, OSError):
        return True
    os.remove(os.path.join(str(path), ".probe"))
    return False


def _make_writable(path):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], stderr=subprocess.PIPE)
    else:
        os.chmod(str(path), 0o755)


def test_read_only_run_folder_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, cache_dir):
    import pytest

    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    proc = _start(TINY + ["train.steps=400", "train.log_every=1", "train.checkpoint_every=3",
                          "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    _wait_for(lambda: (checkpoints / "model.ckpt-3.meta").exists(), proc, "the first checkpoint")
    folders = [run_dir, checkpoints]
    try:
        made = [_make_read_only(folder) for folder in folders]
        if not all(made):
            proc.kill()
            proc.communicate()
            pytest.skip("this file system cannot make a folder read-only (chattr +i / chmod)")
        latest = tf.compat.v1.train.latest_checkpoint(str(checkpoints))  # cannot change from now on
        _, err = proc.communicate(timeout=300)
    finally:
        for folder in folders:
            _make_writable(folder)
    assert proc.returncode == 2, err[-3000:]
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "cannot write checkpoint" in line and str(checkpoints) in line, line
    assert "the previous checkpoint {} is intact".format(latest) in line, line
    assert _readable(latest)
    assert tf.compat.v1.train.latest_checkpoint(str(checkpoints)) == latest
