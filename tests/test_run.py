"""`python run.py` end to end, as subprocesses: the run folder, mode=eval, sweeps and the config errors."""
import glob
import json
import os
import re

import pytest
import yaml

from conftest import TINY, run_py

NUM_DIGITS_EVAL = 359  # the bundled digits' stratified 20% validation split


def only(pattern):
    found = glob.glob(pattern)
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, cache_dir):
    """One tiny default run started from a fresh folder, with no hydra.run.dir: the real default layout."""
    cwd = tmp_path_factory.mktemp("user")
    proc = run_py(TINY, cwd, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = only(os.path.join(str(cwd), "outputs", "*", "*"))
    return cwd, run_dir, proc


def test_run_folder_layout(trained_run):
    cwd, run_dir, proc = trained_run
    date, time = run_dir.split(os.sep)[-2:]
    assert re.match(r"^\d{4}-\d{2}-\d{2}$", date) and re.match(r"^\d{2}-\d{2}-\d{2}\.\d{6}$", time), run_dir
    # Nothing is written outside the run folder (beyond outputs/ itself).
    assert sorted(os.listdir(str(cwd))) == ["outputs"]

    config = yaml.safe_load(open(os.path.join(run_dir, ".hydra", "config.yaml")))
    assert config["model"]["name"] == "efficientnet-lite0" and config["train"]["steps"] == 4

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    state = open(os.path.join(ckpt_dir, "checkpoint")).read()
    assert 'model_checkpoint_path: "model.ckpt-4"' in state
    for step in (2, 4):
        assert os.path.exists(os.path.join(ckpt_dir, "model.ckpt-%d.index" % step))

    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [2, 4]
    for m in metrics:
        assert {"step", "loss", "top1", "lr", "images_per_sec"} <= set(m)
        assert m["loss"] > 0 and 0 <= m["top1"] <= 1 and m["images_per_sec"] > 0

    assert glob.glob(os.path.join(run_dir, "tensorboard", "train", "events.out.tfevents.*"))
    assert glob.glob(os.path.join(run_dir, "tensorboard", "eval", "events.out.tfevents.*"))
    log_text = open(os.path.join(run_dir, "run.log")).read()
    assert "step 4/4" in log_text and "top1" in log_text

    result = json.load(open(os.path.join(run_dir, "eval.json")))
    assert {"top1", "top5", "num_images", "checkpoint", "step"} <= set(result)
    assert result["step"] == 4 and result["checkpoint"].endswith("model.ckpt-4")
    # Every image of the digits validation split counted once.
    assert result["num_images"] == NUM_DIGITS_EVAL
    assert 0 <= result["top1"] <= result["top5"] <= 1
    assert "eval top1 {:.4f}".format(result["top1"]) in proc.stdout
    assert open(os.path.join(run_dir, "labels.txt")).read().split() == [str(i) for i in range(10)]


def test_eval_mode_reproduces_eval_json(trained_run, tmp_path, cache_dir):
    _, run_dir, _ = trained_run
    out = tmp_path / "eval_run"
    proc = run_py(TINY + ["mode=eval", "eval.checkpoint=" + run_dir, "hydra.run.dir=" + str(out)],
                  tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = json.load(open(os.path.join(run_dir, "eval.json")))
    again = json.load(open(str(out / "eval.json")))
    for key in ("top1", "top5", "num_images", "step", "checkpoint"):
        assert again[key] == original[key], key
    assert abs(again["loss"] - original["loss"]) < 1e-6
    assert not os.path.exists(str(out / "checkpoints"))  # eval trains nothing


def test_eval_mode_by_prefix_and_missing_checkpoint(trained_run, tmp_path, cache_dir):
    _, run_dir, _ = trained_run
    prefix = os.path.join(run_dir, "checkpoints", "model.ckpt-2")
    proc = run_py(TINY + ["mode=eval", "eval.checkpoint=" + prefix, "hydra.run.dir=" + str(tmp_path / "a")],
                  tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(str(tmp_path / "a" / "eval.json")))["step"] == 2

    missing = str(tmp_path / "nowhere" / "model.ckpt-9")
    proc = run_py(["mode=eval", "eval.checkpoint=" + missing, "hydra.run.dir=" + str(tmp_path / "b")],
                  tmp_path, cache_dir)
    assert proc.returncode != 0
    assert missing in proc.stderr and "Traceback" not in proc.stderr

    proc = run_py(["mode=eval", "hydra.run.dir=" + str(tmp_path / "c")], tmp_path, cache_dir)
    assert proc.returncode != 0 and "eval.checkpoint" in proc.stderr


def test_relative_data_dir_resolves_against_the_users_folder(tmp_path, cache_dir):
    from effnet_exp.data.bundled import prepare_builtin

    info = prepare_builtin("digits", cache_dir)
    user = tmp_path / "user"
    user.mkdir()
    os.symlink(info["data_dir"], str(user / "mydata"))
    proc = run_py(TINY + ["dataset=tfrecord", "dataset.data_dir=mydata", "dataset.num_classes=10",
                          "dataset.random_flip=false", "hydra.run.dir=runs/r1"], user, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(str(user / "runs" / "r1" / "eval.json")))["num_images"] == NUM_DIGITS_EVAL

    proc = run_py(TINY + ["dataset=tfrecord", "dataset.data_dir=not_there", "hydra.run.dir=runs/r2"],
                  user, cache_dir)
    assert proc.returncode != 0
    assert str(user / "not_there") in proc.stderr
    assert not (user / "runs" / "r2" / "checkpoints").exists()


def test_sweep_runs_each_job_in_its_own_folder(tmp_path, cache_dir):
    proc = run_py(["-m"] + TINY + ["train.steps=2,3"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only(str(tmp_path / "multirun_sweeps" / "*" / "*"))
    assert re.match(r"^\d{2}-\d{2}-\d{2}\.\d{6}$", os.path.basename(sweep))
    steps = [json.load(open(os.path.join(sweep, job, "eval.json")))["step"] for job in ("0", "1")]
    assert steps == [2, 3]


@pytest.mark.parametrize("override,names", [
    ("optimizer.lr=abc", ["optimizer.lr", "abc"]),
    ("optimizer.lrr=1", ["lrr"]),
    ("device.precision_mode=fp16", ["precision_mode"]),  # only device=ascend has it
    ("mode=fit", ["mode", "fit"]),
    ("model=efficientnet_b9", ["efficientnet_b9"]),
])
def test_schema_errors_name_the_key_before_any_work(tmp_path, cache_dir, override, names):
    proc = run_py([override, "hydra.run.dir=" + str(tmp_path / "run")], tmp_path, cache_dir)
    assert proc.returncode != 0
    for name in names:
        assert name in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()  # composition failed before the run folder existed


def test_ascend_without_npu_bridge_fails_at_once(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(["device=ascend", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "npu_bridge" in lines[0] and "device=ascend" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
