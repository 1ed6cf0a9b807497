"""Hydra callback (conf/config.yaml, hydra.callbacks.sweep_report): the sweep report when a sweep ends; at its
start, the checks that would fail every job alike (+logger=mlflow without MLflow).

The jobs themselves never raise into Hydra in a multirun (run_from_hydra records a failure in the job's
status.json and returns NaN), so the sweeper runs every job and on_multirun_end is reached; the failures it
finds make run.py exit non-zero (see sweep_exit_status).
"""
import logging
import os
import sys

from hydra.experimental.callback import Callback

from effnet_exp.errors import UserError
from effnet_exp.reporting.jobs import first_line
from effnet_exp.reporting.mlflow_logger import check_installed
from effnet_exp.reporting.sweep_summary import collect, write_report

log = logging.getLogger(__name__)

_LAST = {}  # the last report of this process: {"sweep_dir", "failed", "jobs"}
_RUNNING = {}  # the sweep this process is running: {"sweep_dir"}


def report_sweep(sweep_dir):
    """write_report, remembered for sweep_exit_status; a report that cannot be written is logged."""
    sweep_dir = os.path.abspath(sweep_dir)
    try:
        report = write_report(sweep_dir)
    except Exception as err:  # the jobs' results are on disk either way; count the failures without a report
        log.error("cannot write the sweep report in %s: %s: %s", sweep_dir, type(err).__name__, first_line(err))
        report = collect(sweep_dir)
    _LAST.update(sweep_dir=sweep_dir, failed=len(report.failed), jobs=len(report.rows))
    log.info("sweep report: %s (%d job(s), %d not completed)", os.path.join(sweep_dir, "summary.md"),
             len(report.rows), len(report.failed))
    return report


class SweepReportCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        _check_before_jobs(config)
        _RUNNING["sweep_dir"] = os.path.abspath(config.hydra.sweep.dir)

    def on_multirun_end(self, config, **kwargs):
        _RUNNING.clear()
        report_sweep(config.hydra.sweep.dir)


def _check_before_jobs(config):
    """What would fail every job the same way ends the sweep before its first: one `error:` line, exit status 2."""
    try:
        check_installed(config)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        sys.exit(2)


def sweep_interrupted(stop):
    """run.py's end after a signal (an Interrupted): the report of the sweep it cut short, if any, and one
    `error:` line; returns the exit status, 128 + the signal."""
    message = str(stop)
    if _RUNNING.get("sweep_dir"):
        report = report_sweep(_RUNNING.pop("sweep_dir"))
        message += "; the sweep stopped after {} job(s), see {}".format(
            len(report.rows), os.path.join(_LAST["sweep_dir"], "summary.md"))
    sys.stderr.write("error: {}\n".format(message))
    return stop.exit_code


def sweep_exit_status():
    """For run.py after Hydra returns: 1 (with one `error:` line) if a job of the sweep just run failed."""
    if not _LAST.get("failed"):
        return 0
    sys.stderr.write("error: {} of {} sweep job(s) failed; see {}\n".format(
        _LAST["failed"], _LAST["jobs"], os.path.join(_LAST["sweep_dir"], "summary.md")))
    return 1
