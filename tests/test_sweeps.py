"""Sweeps as a user runs them (`python run.py -m ...` subprocesses): job isolation in one process,
reproducibility, the sweep report (also when a job fails), the summarize tool, Optuna, and the joblib and
submitit_local launchers. One training sweep and one standalone run are shared by the module's tests."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, TINY, metrics, only, read_json, run_py

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def overrides(base, changes):
    """base key=value list with changes applied (a key given twice would be a Hydra error)."""
    merged = dict(o.split("=", 1) for o in base)
    merged.update(changes)
    return ["{}={}".format(k, v) for k, v in merged.items()]


# Two steps, evaluated at step 2 (train.eval_every) so each job has a periodic and a final eval record.
# Repeatable runs: a seed (see README, "Sweeps"); the default parallel map gives the same batches.
JOB = overrides(TINY, {"optimizer": "sgd_nesterov", "train.steps": "2", "train.log_every": "1",
                       "train.checkpoint_every": "2", "train.eval_every": "2", "seed": "1"})
# Job 1 diverges (loss nan at step 2, as in test_faults.py); job 2 runs after it in the same process.
LRS = ("0.01", "1e30", "0.001")


def checkpoint_variables(run_dir):
    import tensorflow as tf

    prefix = tf.compat.v1.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    assert prefix, run_dir
    return {name: tuple(shape) for name, shape in tf.compat.v1.train.list_variables(prefix)}


def assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 5000, path


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A 3-job grid sweep with the basic launcher (one process), one job failing."""
    cwd = tmp_path_factory.mktemp("sweep_user")
    proc = run_py(["-m"] + JOB + ["optimizer.lr=" + ",".join(LRS)], cwd, cache_dir)
    sweep_dir = only(str(cwd / "multirun_sweeps" / "*" / "*"))
    return proc, sweep_dir


@pytest.fixture(scope="module")
def alone(tmp_path_factory, cache_dir):
    """Job 2 of the sweep (same config, same seed), run on its own."""
    cwd = tmp_path_factory.mktemp("alone_user")
    run_dir = str(cwd / "run")
    proc = run_py(JOB + ["optimizer.lr=" + LRS[2], "hydra.run.dir=" + run_dir], cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_failed_job_does_not_stop_the_sweep_and_the_exit_status_says_so(sweep):
    proc, sweep_dir = sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: 1 of 3 sweep job(s) failed; see {}".format(os.path.join(sweep_dir, "summary.md"))]
    statuses = [read_json(os.path.join(sweep_dir, str(n), "status.json")) for n in range(3)]
    assert [s["status"] for s in statuses] == ["completed", "failed", "completed"]
    assert statuses[1]["error"].startswith("loss became nan at step 2") and \
        statuses[1]["error_type"] == "NonFiniteLoss"
    assert "loss became nan at step 2" in open(os.path.join(sweep_dir, "1", "run.log")).read()
    # Jobs after the failure ran to the end: their results are there.
    for n, status in ((0, statuses[0]), (2, statuses[2])):
        result = read_json(os.path.join(sweep_dir, str(n), "eval.json"))
        assert result["step"] == 2 and status["result"] == pytest.approx(result["top1"], abs=1e-12)
        assert "optimizer.lr=" + LRS[n] in status["overrides"]
    # The basic launcher: all three jobs in the one sweep process.
    assert len({s["pid"] for s in statuses}) == 1


def test_jobs_are_isolated_and_match_the_same_job_run_alone(sweep, alone):
    _, sweep_dir = sweep
    job0, job2 = os.path.join(sweep_dir, "0"), os.path.join(sweep_dir, "2")
    # Each job's graph held only its own variables: the checkpoint (a Saver over all global variables of
    # the job's graph) has exactly the variables of a run alone, none of an earlier job's (a second model in
    # one graph would be scoped `efficientnet-lite0_1/...`).
    own = checkpoint_variables(alone)
    assert len(own) > 100 and {n.split("/")[0] for n in own} == {"efficientnet-lite0", "global_step"}
    assert checkpoint_variables(job0) == own
    assert checkpoint_variables(job2) == own
    # Job 2 ran after job 0 and after a failed job in the same process; same config and seed as the run
    # alone: the same metrics to float tolerance (seeded Python, NumPy, TF graph and input shuffling).
    swept, single = metrics(job2), metrics(alone)
    assert [m["step"] for m in swept] == [m["step"] for m in single] == [1, 2, 2]
    for a, b in zip(swept, single):
        for key in ("loss", "top1", "eval_top1", "eval_top5"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a, b)
    final_swept, final_single = read_json(os.path.join(job2, "eval.json")), read_json(os.path.join(alone, "eval.json"))
    for key in ("top1", "top5", "loss", "num_images", "step"):
        assert final_swept[key] == pytest.approx(final_single[key], rel=1e-4, abs=1e-5), key
    # A different lr really gives a different run (the comparison above can fail).
    assert metrics(job0)[1]["loss"] != pytest.approx(swept[1]["loss"], rel=1e-4)


def test_every_run_folder_gets_curves_and_the_log_an_eta(sweep, alone):
    _, sweep_dir = sweep
    for run_dir in (alone, os.path.join(sweep_dir, "0"), os.path.join(sweep_dir, "2")):
        assert_png(os.path.join(run_dir, "curves.png"))
        log_text = open(os.path.join(run_dir, "run.log")).read()
        assert "step 2/2" in log_text and " eta " in log_text
        assert "could not draw" not in log_text
        assert not glob.glob(os.path.join(run_dir, ".curves.png.*"))  # no temporary file left


def test_sweep_report_rows_sorted_by_top1_with_the_failure(sweep):
    _, sweep_dir = sweep
    rows = read_csv(os.path.join(sweep_dir, "summary.csv"))
    assert [r["status"] for r in rows] == ["completed", "completed", "failed"]
    finals = {n: read_json(os.path.join(sweep_dir, str(n), "eval.json")) for n in (0, 2)}
    order = sorted((0, 2), key=lambda n: -finals[n]["top1"])
    assert [r["job"] for r in rows] == [str(order[0]), str(order[1]), "1"]
    for row in rows[:2]:
        final = finals[int(row["job"])]
        assert float(row["top1"]) == pytest.approx(final["top1"], abs=1e-6)
        assert float(row["top5"]) == pytest.approx(final["top5"], abs=1e-6)
        assert float(row["best_top1"]) == pytest.approx(final["top1"], abs=1e-6)
        assert row["steps"] == "2" and float(row["images_per_sec"]) > 0 and float(row["wall_sec"]) > 0
        assert "optimizer.lr=" + LRS[int(row["job"])] in row["overrides"]
    failed = rows[2]
    assert failed["error"].startswith("loss became nan at step 2") and failed["top1"] == ""
    md = open(os.path.join(sweep_dir, "summary.md")).read()
    assert "3 job(s): 2 completed, 1 failed" in md
    assert "| 1 | `optimizer.lr=1e+30` | failed: loss became nan at step 2" in md
    assert_png(os.path.join(sweep_dir, "summary.png"))


def test_summarize_rebuilds_the_report_from_the_job_folders(sweep):
    _, sweep_dir = sweep
    before = {name: open(os.path.join(sweep_dir, name)).read() for name in ("summary.csv", "summary.md")}
    for name in ("summary.csv", "summary.md", "summary.png"):
        os.remove(os.path.join(sweep_dir, name))
    proc = subprocess.run([sys.executable, "-m", "effnet_exp.tools.summarize", sweep_dir], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # a job of this sweep failed
    for name, text in before.items():
        assert open(os.path.join(sweep_dir, name)).read() == text, name
    assert_png(os.path.join(sweep_dir, "summary.png"))
    assert "failed: loss became nan" in proc.stdout
    assert not [p for p in os.listdir(sweep_dir) if p.endswith(".tmp")]
    proc = subprocess.run([sys.executable, "-m", "effnet_exp.tools.summarize", os.path.join(sweep_dir, "0")],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=120)
    assert proc.returncode == 2 and "holds no job folders" in proc.stderr


def test_joblib_launcher_runs_jobs_with_a_share_of_the_cores(alone, tmp_path, cache_dir):
    """Two evaluation jobs of the run above in parallel worker processes."""
    proc = run_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mode=eval",
                   "eval.checkpoint=" + alone, "eval.batch_size=128,100"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = only(str(tmp_path / "multirun_sweeps" / "*" / "*"))
    expected = read_json(os.path.join(alone, "eval.json"))["top1"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for n in (0, 1):
        job = os.path.join(sweep_dir, str(n))
        assert read_json(os.path.join(job, "eval.json"))["top1"] == pytest.approx(expected, abs=1e-12)
        assert read_json(os.path.join(job, "status.json"))["status"] == "completed"
        saved = yaml.safe_load(open(os.path.join(job, ".hydra", "effnet_config.yaml")))
        assert saved["device"]["intra_op_threads"] == max(1, cores // 2)
        assert "device.intra_op_threads={}".format(max(1, cores // 2)) in open(os.path.join(job, "run.log")).read()
    rows = read_csv(os.path.join(sweep_dir, "summary.csv"))
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_optuna_search_with_submitit_local_maximises_the_returned_top1(alone, tmp_path, cache_dir):
    """The lr_optuna preset (2 trials) through submitit_local: each trial a fresh process."""
    proc = run_py(["-m", "+hparams_search=lr_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                   "hydra/launcher=submitit_local", "mode=eval", "eval.checkpoint=" + alone], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = only(str(tmp_path / "multirun_sweeps" / "*" / "*"))
    expected = read_json(os.path.join(alone, "eval.json"))["top1"]
    results = yaml.safe_load(open(os.path.join(sweep_dir, "optimization_results.yaml")))
    assert results["best_value"] == pytest.approx(expected, abs=1e-12)  # the float run_from_hydra returned
    assert {"optimizer.lr", "train.batch_size"} <= set(results["best_params"])
    statuses = [read_json(os.path.join(sweep_dir, str(n), "status.json")) for n in (0, 1)]
    assert [s["status"] for s in statuses] == ["completed", "completed"]
    assert len({s["pid"] for s in statuses}) == 2  # one fresh process per job
    assert any(o.startswith("optimizer.lr=") for o in statuses[0]["overrides"])
    assert os.path.isdir(os.path.join(sweep_dir, ".submitit"))
    assert len(read_csv(os.path.join(sweep_dir, "summary.csv"))) == 2


def _compose(overrides_list):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from effnet_exp.config import register_configs
    from effnet_exp.resume import pick_run_dir

    register_configs()
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", pick_run_dir)
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides_list, return_hydra_config=True)


def test_composed_sweep_presets():
    """Config only (no job runs): Optuna preset, sweep folders, callback, SLURM launcher."""
    import re

    from omegaconf import OmegaConf

    cfg = _compose(["+hparams_search=lr_optuna", "hydra.sweeper.n_trials=7"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.n_trials == 7
    assert str(sweeper.direction) in ("maximize", "Direction.maximize")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    for key in sweeper.params:  # every searched key exists in the run config
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert {"optimizer.lr", "train.batch_size"} <= set(sweeper.params)
    assert cfg.hydra.callbacks.sweep_report._target_ == \
        "effnet_exp.reporting.hydra_callback.SweepReportCallback"
    # Two sweeps started at the same moment get different folders: the time has microseconds.
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), "--cfg", "hydra", "--resolve",
                               "-p", "hydra.sweep.dir"], stdout=subprocess.PIPE, universal_newlines=True)
             for _ in range(2)]
    folders = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert folders[0] != folders[1]
    for folder in folders:
        assert re.match(r"^multirun_sweeps/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}\.\d{6}$", folder), folder

    cfg = _compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.gpus_per_node=8", "hydra.launcher.timeout_min=240"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 8, 240)
    cfg = _compose(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=ascend",
                    "hydra.launcher.gres=npu:8"])
    assert cfg.hydra.launcher.gres == "npu:8"


def test_a_train_job_returns_its_last_evaluation_or_nan(tmp_path, cache_dir):
    """mode=train gives the sweeper the top-1 of its last train.eval_every evaluation, NaN without one (status.json
    records it; a NaN as null), never the training top-1."""
    sweep_dir = tmp_path / "sweep"
    proc = run_py(["-m", "mode=train", "train.eval_every=0,2", "hydra.sweep.dir=" + str(sweep_dir)] +
                  overrides(TINY, {"train.steps": "2"}), tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(str(sweep_dir / "0" / "status.json"))["result"] is None
    evals = [json.loads(l) for l in open(str(sweep_dir / "1" / "metrics.jsonl")) if "eval_top1" in l]
    assert [e["step"] for e in evals] == [2]
    assert read_json(str(sweep_dir / "1" / "status.json"))["result"] == evals[0]["eval_top1"]
