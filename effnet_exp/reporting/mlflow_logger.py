"""+logger=mlflow (conf/logger/mlflow.yaml): a job's run folder copied into an MLflow tracking store once the job
has ended, whatever its end (completed, failed, interrupted).

One MLflow run per job, named after its run folder:
  params      the job's command-line overrides (Hydra's overrides.task), `+`/`~` prefixes dropped from the keys
  metrics     every number of metrics.jsonl at its step (a step logged twice, after a resume: the later value),
              and every number of eval.json as final/<field> at eval.json's step ([low, high] pairs such as
              top1_ci95 as final/<field>_low and _high)
  artifacts   the run folder's PNG and CSV files, eval.json, run.log and the composed config (hydra/config.yaml)
  tags        effnet_exp.status (completed / failed / interrupted), effnet_exp.error, effnet_exp.run_dir
The experiment: logger.experiment, else for a sweep job the sweep folder's path relative to the directory run.py
started in (multirun_sweeps/<date>/<time>), else "effnet_exp". resume= logs only with +logger=mlflow on its own
command line, and replaces the earlier MLflow run of that folder (the folder is logged whole again).

MLflow is imported when the logger opens, before the job's work (without it: a UserError, one `error:` line);
it logs after the work, so a tracking problem cannot touch the run: a failure to log is one warning in run.log.
"""
import logging
import math
import numbers
import os
import re
import time

from hydra.types import RunMode

from effnet_exp import optional, run_folder
from effnet_exp.reporting.jobs import COMPLETED, FAILED, INTERRUPTED, STATUS_FILE, first_line

log = logging.getLogger(__name__)

SINGLE_RUN_EXPERIMENT = "effnet_exp"
MLFLOW_STATUS = {COMPLETED: "FINISHED", FAILED: "FAILED", INTERRUPTED: "KILLED"}
ARTIFACT_SUFFIXES = (".png", ".csv")
# The smallest limits of the MLflow releases in use (1.30 on Python 3.7).
MAX_PARAM_VALUE, MAX_TAG_VALUE, PARAMS_PER_BATCH, METRICS_PER_BATCH = 500, 5000, 100, 1000
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_NOT_IN_NAMES = re.compile(r"[^\w./\- ]")


def open_logger(cfg, hydra_cfg, run_dir):
    """The job's MlflowLogger with +logger=mlflow, else None; UserError when MLflow cannot be imported."""
    settings = cfg.get("logger")
    if settings is None:
        return None
    return MlflowLogger(settings, hydra_cfg, run_dir, resumed=bool(cfg.resume))


def check_installed(cfg):
    """For a sweep's start: UserError with +logger=mlflow and no MLflow."""
    if cfg.get("logger") is not None:
        optional.mlflow()


class MlflowLogger(object):
    def __init__(self, settings, hydra_cfg, run_dir, resumed):
        self.api = optional.mlflow()
        start_dir = hydra_cfg.runtime.cwd
        self.uri = tracking_uri(settings.tracking_uri, start_dir)
        self.run_dir = os.path.abspath(run_dir)
        self.experiment = settings.experiment or experiment_name(hydra_cfg, self.run_dir, start_dir)
        self.overrides = list(hydra_cfg.overrides.task)
        self.resumed = resumed
        self.started_ms = _now_ms()

    def log_run(self, status, error=None):
        """Copies the run folder into the store as one MLflow run; never raises (a failure is one warning)."""
        try:
            run_id = self._log(status, error)
        except Exception as err:  # the job's result stands whatever the store does
            log.warning("mlflow: this run was not logged to %s: %s: %s", self.uri, type(err).__name__,
                        first_line(err))
            return None
        log.info("mlflow %s: logged as run %s of experiment %r in %s", self.api.version, run_id, self.experiment,
                 self.uri)
        return run_id

    def _log(self, status, error):
        if self.uri.startswith("file:") or not _URI_SCHEME.match(self.uri):
            # MLflow 3 refuses a folder store (maintenance mode) unless asked; MLflow 1.x ignores this.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = self.api.MlflowClient(self.uri)
        experiment_id = _experiment_id(client, self.experiment)
        if self.resumed:
            _delete_earlier_runs(client, experiment_id, self.run_dir)
        run = client.create_run(experiment_id, start_time=self.started_ms, tags=self._tags(status, error))
        run_id = run.info.run_id
        try:
            self._log_contents(client, run_id)
        except Exception:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, MLFLOW_STATUS[status])
        return run_id

    def _tags(self, status, error):
        tags = {"mlflow.runName": run_name(self.run_dir), "effnet_exp.run_dir": self.run_dir,
                "effnet_exp.status": status}
        if error is not None:
            tags["effnet_exp.error"] = first_line(error)[:MAX_TAG_VALUE]
        return tags

    def _log_contents(self, client, run_id):
        api, now = self.api, _now_ms()
        params = [api.Param(key, value) for key, value in override_params(self.overrides)]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[start:start + PARAMS_PER_BATCH])
        records = run_folder.read_metrics(run_folder.metrics_path(self.run_dir))
        final = run_folder.read_json(run_folder.eval_path(self.run_dir)) or {}
        metrics = [api.Metric(key, value, now, step)
                   for key, value, step in series_metrics(records) + final_metrics(final)]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + METRICS_PER_BATCH])
        for path, folder in artifacts(self.run_dir):
            client.log_artifact(run_id, path, folder)


def tracking_uri(value, start_dir):
    """A folder (relative to the directory run.py started in) as an absolute path; a URI as it is."""
    if _URI_SCHEME.match(value):
        return value
    return os.path.abspath(os.path.join(start_dir, os.path.expanduser(value)))


def experiment_name(hydra_cfg, run_dir, start_dir):
    """A sweep job's: its sweep folder (hydra.sweep.dir; for resume= of a job, the folder holding it), relative
    to the start directory when inside it; a single run's: SINGLE_RUN_EXPERIMENT."""
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dir = os.path.abspath(os.path.join(start_dir, str(hydra_cfg.sweep.dir)))
    elif os.path.isfile(os.path.join(run_dir, STATUS_FILE)):  # a sweep job's folder, resumed as a single run
        sweep_dir = os.path.dirname(run_dir)
    else:
        return SINGLE_RUN_EXPERIMENT
    relative = os.path.relpath(sweep_dir, start_dir)
    name = sweep_dir if relative.split(os.sep)[0] == os.pardir else relative
    return name.replace(os.sep, "/")


def run_name(run_dir):
    return os.path.basename(os.path.normpath(run_dir))


def override_params(overrides):
    """[(key, value)] of Hydra override strings: `+key=v` as key, `~key` as key=(deleted); keys made valid
    MLflow names."""
    params = {}
    for override in overrides:
        key, _, value = override.partition("=")
        if key.startswith("~"):
            value = "(deleted)"
        key = _NOT_IN_NAMES.sub("_", key.lstrip("+~")).strip("/")
        params[key] = value[:MAX_PARAM_VALUE]
    return sorted(params.items())


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def series_metrics(records):
    """[(key, value, step)] of metrics.jsonl's records: every finite number but the step itself."""
    latest = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if key != "step" and _number(value):
                latest[(_NOT_IN_NAMES.sub("_", key), step)] = float(value)
    return [(key, value, step) for (key, step), value in sorted(latest.items())]


def final_metrics(result):
    """[(key, value, step)] of eval.json: its numbers as final/<field>, its [low, high] pairs as _low / _high."""
    step = result.get("step") if isinstance(result.get("step"), int) else 0
    found = []
    for field, value in sorted(result.items()):
        name = "final/" + _NOT_IN_NAMES.sub("_", field)
        if _number(value):
            found.append((name, float(value), step))
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) for v in value):
            found += [(name + "_low", float(value[0]), step), (name + "_high", float(value[1]), step)]
    return found


def artifacts(run_dir):
    """[(path, artifact folder or None)]: what log_run copies, where it exists."""
    names = sorted(os.listdir(run_dir))
    found = [(os.path.join(run_dir, n), None) for n in names if n.lower().endswith(ARTIFACT_SUFFIXES)]
    found += [(run_folder.eval_path(run_dir), None), (os.path.join(run_dir, "run.log"), None),
              (os.path.join(run_dir, run_folder.HYDRA_CONFIG), "hydra")]
    return [(path, folder) for path, folder in found if os.path.isfile(path)]


def _experiment_id(client, name):
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # created meanwhile by another job of a parallel sweep
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _delete_earlier_runs(client, experiment_id, run_dir):
    """A resumed run's folder is logged again whole: its earlier MLflow runs are marked deleted."""
    name = run_name(run_dir)
    if "'" in name:
        return
    for earlier in client.search_runs([experiment_id], "tags.mlflow.runName = '{}'".format(name)):
        if earlier.data.tags.get("effnet_exp.run_dir") == run_dir:
            client.delete_run(earlier.info.run_id)


def _now_ms():
    return int(time.time() * 1000)
