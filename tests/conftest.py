import glob
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "run.py")

# Small enough for CI on 2 cores: B0 at 32x32, a handful of steps.
TINY = ["model.image_size=32", "train.batch_size=8", "train.steps=4", "train.log_every=2",
        "train.checkpoint_every=2", "eval.batch_size=128"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Where the bundled dataset is converted; shared by the tests of one session."""
    return os.environ.get("EFFNET_EXP_CACHE") or str(tmp_path_factory.mktemp("cache"))


def run_py(args, cwd, cache_dir, timeout=600):
    """Runs run.py as a user would, from cwd; returns the CompletedProcess."""
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, RUN_PY] + list(args), cwd=str(cwd), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=timeout)


def only(pattern):
    found = glob.glob(pattern)
    assert len(found) == 1, (pattern, found)
    return found[0]


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
