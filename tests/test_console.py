"""A quiet console: `python run.py` shows our lines (progress, results, errors), not TensorFlow's C++ start-up
banner or its deprecation notices; TensorFlow's own log still reaches run.log."""
import os
import re
import subprocess
import sys

import pytest

from conftest import RUN_PY, TINY

# TensorFlow's C++ INFO lines (TF 1.x "2026-01-01 10:00:00.123: I tensorflow/...", TF 2.x absl "I0101 10:00:00.1 ..."),
# absl's notice before its first line, and TensorFlow's Python logger.
TF_NOISE = [re.compile(p, re.M) for p in (
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I ", r"^I\d{4} ", r"absl::InitializeLog", r"oneDNN", r"cpu_feature_guard",
    r"is deprecated and will be removed", r"Instructions for updating", r"\]\[tensorflow\]\[", r"\]\[absl\]\[",
    r"\]\[py\.warnings\]\[")]


def run_as_user(args, cwd, cache_dir):
    """run.py as a user starts it: unlike conftest.run_py, with no TF_CPP_MIN_LOG_LEVEL of our own."""
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, RUN_PY] + list(args), cwd=str(cwd), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    return proc, proc.stdout + proc.stderr


def tensorflow_noise(text):
    return [m.group(0) for pattern in TF_NOISE for m in [pattern.search(text)] if m]


def test_training_run_shows_our_lines_only(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc, console = run_as_user(TINY + ["hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, console[-3000:]
    assert tensorflow_noise(console) == [], console
    for ours in ("run folder", "step 2/4", "step 4/4", "eval top1"):
        assert ours in console, console
    run_log = (run_dir / "run.log").read_text()
    for ours in ("][effnet_exp.", "step 4/4", "top1"):
        assert ours in run_log
    # TensorFlow's own warnings (here the deprecation notices of the legacy ops used on purpose) stay in run.log.
    assert "][tensorflow][WARNING] - " in run_log


@pytest.mark.parametrize("override", ["device=ascend", "dataset=tfrecord"])
def test_an_error_is_the_only_console_line(tmp_path, cache_dir, override):
    """device=ascend fails after TensorFlow loaded (no npu_bridge), dataset=tfrecord before (no data_dir)."""
    proc, console = run_as_user([override, "hydra.run.dir=" + str(tmp_path / "run")], tmp_path, cache_dir)
    assert proc.returncode == 2
    lines = console.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), console
