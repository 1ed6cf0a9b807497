"""+logger=mlflow as a user runs it: a single run and a 2-job sweep logged into local MLflow stores, read back with
MLflow's own client; without MLflow, one `error:` line before any work; a store that cannot be written, one
warning and the job's result unchanged."""
import glob
import logging
import os
from types import SimpleNamespace

import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from conftest import TINY, metrics, only, read_json, run_py
from effnet_exp.reporting.mlflow_logger import SINGLE_RUN_EXPERIMENT, MlflowLogger, override_params

# MLflow 3 opens a folder store only when asked (MLflow 1.x ignores this); run.py asks the same way.
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def expected_params(run_dir):
    """The job's overrides as Hydra recorded them, `+key=value` as key: value."""
    with open(os.path.join(run_dir, ".hydra", "overrides.yaml")) as f:
        overrides = yaml.safe_load(f)
    return dict(o.lstrip("+").split("=", 1) for o in overrides)


def the_runs(store, experiment):
    client = MlflowClient(store)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    return client, client.search_runs([found.experiment_id])


def assert_run_mirrors_folder(client, run, run_dir):
    """Name, params, status, the metrics.jsonl series, eval.json's numbers and the PNGs of one run folder."""
    assert run.data.tags["mlflow.runName"] == os.path.basename(run_dir)
    assert run.data.tags["effnet_exp.run_dir"] == run_dir
    assert run.info.status == "FINISHED" and run.data.tags["effnet_exp.status"] == "completed"
    assert run.data.params == expected_params(run_dir)
    records = metrics(run_dir)
    for key in ("loss", "top1", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["step"], r[key]) for r in records if r.get(key) is not None], key
        assert len(history) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    pngs = {os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.png"))}
    assert "curves.png" in pngs and pngs <= artifacts, (pngs, artifacts)
    assert {"run.log", "hydra"} <= artifacts
    return artifacts


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_dir):
    """One tiny default run (train_eval: eval.json) into a store named by logger.tracking_uri."""
    cwd = tmp_path_factory.mktemp("tracked_run")
    store = str(cwd / "elsewhere" / "mlruns")
    proc = run_py(TINY + ["+logger=mlflow", "logger.tracking_uri=" + store], cwd, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return store, only(os.path.join(str(cwd), "outputs", "*", "*"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """A 2-job training sweep into the default store, ./mlruns of the directory run.py started in."""
    cwd = tmp_path_factory.mktemp("tracked_sweep")
    proc = run_py(["-m", "mode=train", "optimizer.lr=1e-3,1e-4", "+logger=mlflow"] + TINY, cwd, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(cwd), only(os.path.join(str(cwd), "multirun_sweeps", "*", "*"))


def test_a_single_run_is_one_mlflow_run_with_its_overrides_metrics_eval_and_figures(single):
    store, run_dir = single
    client, runs = the_runs(store, SINGLE_RUN_EXPERIMENT)
    assert len(runs) == 1
    run = runs[0]
    artifacts = assert_run_mirrors_folder(client, run, run_dir)
    assert "eval.json" in artifacts
    assert run.data.params["logger"] == "mlflow" and run.data.params["logger.tracking_uri"] == store
    final = read_json(os.path.join(run_dir, "eval.json"))
    numbers = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"top1", "top5", "loss", "step"} <= set(numbers)
    for key, value in numbers.items():
        assert run.data.metrics["final/" + key] == pytest.approx(value, rel=1e-12), key
        assert [m.step for m in client.get_metric_history(run.info.run_id, "final/" + key)] == [final["step"]]
    if "top1_ci95" in final:  # a [low, high] pair
        low, high = final["top1_ci95"]
        assert (run.data.metrics["final/top1_ci95_low"], run.data.metrics["final/top1_ci95_high"]) == \
            pytest.approx((low, high))
    with open(os.path.join(run_dir, "run.log")) as f:
        assert "mlflow " in f.read()  # the line saying where it was logged


def test_a_sweep_is_one_experiment_with_one_run_per_job(sweep):
    cwd, sweep_dir = sweep
    experiment = os.path.relpath(sweep_dir, cwd).replace(os.sep, "/")
    assert experiment.startswith("multirun_sweeps/")
    client, runs = the_runs(os.path.join(cwd, "mlruns"), experiment)
    by_name = {r.data.tags["mlflow.runName"]: r for r in runs}
    assert sorted(by_name) == ["0", "1"] and len(runs) == 2
    for job, lr in (("0", "0.001"), ("1", "0.0001")):  # as Hydra writes a swept value
        run_dir = os.path.join(sweep_dir, job)
        assert_run_mirrors_folder(client, by_name[job], run_dir)
        assert by_name[job].data.params["optimizer.lr"] == lr
        assert not os.path.exists(os.path.join(run_dir, "eval.json"))  # mode=train: nothing more to log


@pytest.mark.parametrize("sweeping", [False, True], ids=["run", "sweep"])
def test_without_mlflow_one_error_line_before_any_work(tmp_path, cache_dir, monkeypatch, sweeping):
    # A test device: a package named mlflow ahead of site-packages whose import fails, as if MLflow were absent.
    shim = tmp_path / "no_mlflow" / "mlflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(u"raise ImportError('No module named mlflow (hidden by tests/test_mlflow.py)')\n")
    monkeypatch.setenv("PYTHONPATH", str(shim.parent), prepend=os.pathsep)
    cwd = tmp_path / "user"
    cwd.mkdir()
    args = (["-m", "optimizer.lr=1e-3,1e-4"] if sweeping else []) + TINY + ["+logger=mlflow"]
    proc = run_py(args, cwd, cache_dir)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "+logger=mlflow needs MLflow" in errors[0] and "pip install" in errors[0], errors
    assert not (cwd / "mlruns").exists()
    if sweeping:
        assert not glob.glob(str(cwd / "multirun_sweeps" / "*" / "*" / "*")), "a job started"
    else:
        run_dir = only(str(cwd / "outputs" / "*" / "*"))
        assert sorted(os.listdir(run_dir)) == [".hydra", "run.log"]


def test_a_store_that_cannot_be_written_is_one_warning(tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text(u"a file where the store would be\n")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(u'{"step": 1, "loss": 2.0}\n')
    hydra_cfg = SimpleNamespace(runtime=SimpleNamespace(cwd=str(tmp_path)), mode=None,
                                overrides=SimpleNamespace(task=["optimizer.lr=0.1"]))
    settings = OmegaConf.create({"tracking_uri": str(blocker / "mlruns"), "experiment": None})
    tracker = MlflowLogger(settings, hydra_cfg, str(run_dir), resumed=False)
    with caplog.at_level(logging.WARNING):
        assert tracker.log_run("completed") is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("effnet_exp")]
    assert len(warnings) == 1 and "this run was not logged to " + str(blocker / "mlruns") in warnings[0].getMessage()


def test_override_keys_become_mlflow_param_names():
    assert override_params(["+logger=mlflow", "++seed=3", "~train.steps", "hydra/launcher=joblib",
                            "model@backbone=efficientnet_b0", "predict.images=[a.jpg,b.jpg]"]) == [
        ("hydra/launcher", "joblib"), ("logger", "mlflow"), ("model_backbone", "efficientnet_b0"),
        ("predict.images", "[a.jpg,b.jpg]"), ("seed", "3"), ("train.steps", "(deleted)")]
