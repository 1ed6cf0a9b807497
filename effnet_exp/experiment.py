"""One run: validate the composed config, build the device and the run spec, then train, evaluate, predict or
export. run_from_hydra is the body of run.py's @hydra.main."""
import logging
import os
import random
import sys
import time

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from effnet_exp import interrupts, run_folder
from effnet_exp.modes import Mode
from effnet_exp.devices.base import Purpose
from effnet_exp.devices.factory import make_device
from effnet_exp.errors import UserError
from effnet_exp.export.calibration import calibration_images
from effnet_exp.export.config import wants_int8
from effnet_exp.export.exporter import export_model, summary_text
from effnet_exp.inference.export_report import report_markdown, report_of_spec
from effnet_exp.inference.evaluator import Evaluator
from effnet_exp.inference.predictor import Predictor, report
from effnet_exp.reporting import drawing
from effnet_exp.reporting.curves import update_curves
from effnet_exp.reporting.jobs import COMPLETED, FAILED, INTERRUPTED, JobStatus, share_cores
from effnet_exp.reporting.mlflow_logger import open_logger
from effnet_exp.reporting.train_summary import write_train_summary
from effnet_exp.resume import resumed_config, save_config
from effnet_exp.spec import resolve_spec
from effnet_exp.training.progressive import eval_spec
from effnet_exp.training.trainer import Trainer
from effnet_exp.validate import validate

log = logging.getLogger(__name__)


def prepare(cfg, run_dir, environ=None):
    """The RunSpec of a composed config (a DictConfig or RunConfig) in its run folder; every check runs here."""
    typed = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
    validate(typed)
    device = make_device(typed.device, environ)
    device.check(typed)
    run_dir = os.path.abspath(run_dir)
    own_dir = run_folder.process_dir(run_dir, device.placement)
    device.use_folder(own_dir)
    if own_dir != run_dir:
        _move_log_file(run_dir, own_dir)
    return resolve_spec(typed, device, run_dir, own_dir)


def run(spec):
    """Runs spec's mode; returns the number a sweeper optimises (the final eval top-1, or a count)."""
    log.info("%s", spec.device.describe())
    random.seed(spec.cfg.seed)
    np.random.seed(spec.cfg.seed)
    if spec.class_names and spec.placement.chief:
        run_folder.write_labels(spec.run_dir, spec.class_names)
    mode = {Mode.predict: _predict, Mode.export: _export, Mode.eval: _evaluate}.get(spec.cfg.mode, _train)
    try:
        result = mode(spec)
    except BaseException:
        drawing.finish(discard=True)
        raise
    drawing.finish()  # the figures drawn in the background: a finished run has all its files
    return result


def _train(spec):
    """The final eval top-1: after an early stop, the best checkpoint's (either mode); else mode=train gives the last
    train.eval_every evaluation's, or NaN without one."""
    evaluator = Evaluator(eval_spec(spec)) if spec.evaluates else None  # train.progressive may evaluate at its own size
    started = time.time()
    with interrupts.phase("training"):
        trained = Trainer(spec, evaluate=evaluator.evaluate if evaluator else None).train()
    write_train_summary(spec, time.time() - started)  # the ModelZoo figures: images/s, ms/step, final loss
    result = (trained.get("last_eval") or {}).get("top1")
    if evaluator and (trained.get("early_stop") or spec.cfg.mode == Mode.train_eval):
        with interrupts.phase("evaluating"):
            final = _final_evaluation(spec, evaluator, trained)
        result = final["top1"]
        print(_eval_line(final) + _best_note(final))
    update_curves(spec.own_dir)  # the final curves.png, with the final evaluation
    return float(result) if result is not None else float("nan")


def _final_evaluation(spec, evaluator, trained):
    """eval.json: the best checkpoint after an early stop (it says so), else the last one."""
    stop = trained.get("early_stop")
    if not stop:
        return trained.get("eval") or evaluator.evaluate(trained["checkpoint"])
    log.info("final evaluation of the best checkpoint, %s (stopped early at step %d)", stop["best_checkpoint"],
             stop["step"])
    return evaluator.evaluate(os.path.join(spec.run_dir, stop["best_checkpoint"]),
                              note={"best_checkpoint": True, "early_stop": stop})


def _eval_line(result):
    """An evaluation on the console: top-1 with its bootstrap 95% interval, and the balanced accuracy."""
    return "eval top1 {:.4f} [95% CI {:.4f}, {:.4f}] balanced accuracy {:.4f}".format(
        result["top1"], result["top1_ci95"][0], result["top1_ci95"][1], result["balanced_accuracy"])


def _best_note(final):
    stop = final.get("early_stop")
    return " (the best checkpoint, step {}; stopped early at step {})".format(final["step"], stop["step"]) \
        if stop else ""


def _evaluate(spec):
    with interrupts.phase("evaluating"):
        result = Evaluator(spec).evaluate(spec.checkpoint)
    print(_eval_line(result))
    return float(result["top1"])


def _predict(spec):
    cfg = spec.cfg
    predictor = Predictor(spec.model, spec.image_size, spec.normalization, cfg.dataset.crop_padding,
                          spec.class_names, spec.device.session_config(Purpose.INFERENCE),
                          threads=cfg.device.intra_op_threads)
    with interrupts.phase("predicting"):
        results = predictor.predict(spec.checkpoint, list(cfg.predict.images), cfg.predict.top_k, use_ema=spec.use_ema)
    failed = report(results, spec.run_dir)
    if failed:
        first = next(r["error"] for r in results if "error" in r)
        raise UserError("{} of {} images could not be predicted, the first: {} (all in {})".format(
            failed, len(results), first, run_folder.predictions_path(spec.run_dir)))
    return float(len(results))


def _export(spec):
    cfg = spec.cfg
    with interrupts.phase("exporting"):
        calibration = None
        if wants_int8(cfg.export):
            calibration = calibration_images(spec.source, cfg.dataset, spec.image_size, spec.normalization,
                                             cfg.export.calibration_images, cfg.seed)
        manifest = export_model(spec.checkpoint, spec.model, spec.image_size, spec.normalization, spec.run_dir,
                                cfg.export, class_names=spec.class_names, crop_padding=cfg.dataset.crop_padding,
                                session_config=spec.device.session_config(Purpose.INFERENCE),
                                calibration=calibration)
    print(summary_text(manifest))
    if cfg.export.report:
        with interrupts.phase("evaluating"):
            print(report_markdown(report_of_spec(spec)))
    return float(len(manifest["files"]))


def _move_log_file(run_dir, own_dir):
    """A process other than the chief logs into its own folder (Hydra opened run.log in the run folder)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and os.path.dirname(handler.baseFilename) == run_dir:
            moved = logging.FileHandler(os.path.join(own_dir, os.path.basename(handler.baseFilename)))
            moved.setLevel(handler.level)
            moved.setFormatter(handler.formatter)
            root.removeHandler(handler)
            handler.close()
            root.addHandler(moved)
    log.info("this process is not the chief: it writes only %s", own_dir)


def run_from_hydra(cfg):
    """The body of run.py's @hydra.main: returns the final eval top-1 for sweepers."""
    interrupts.install()  # done by run.py already, except in the worker processes of some launchers
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # Sweep jobs (and a resumed sweep job) record running / completed / failed for the sweep report.
    status = JobStatus.open(run_dir, hydra_cfg, multirun)
    with interrupts.last_word(lambda: status and status.interrupted("stopped at once by a second signal")):
        result = _run_job(cfg, hydra_cfg, run_dir, status, multirun)
    interrupts.fault_point("job_end")
    return result


def _run_job(cfg, hydra_cfg, run_dir, status, multirun):
    """run_from_hydra's job: its result and status, or a failure recorded in status and reported as one
    error line (a sweep job's: NaN to the sweeper)."""
    tracker = spec = None
    try:
        tracker = open_logger(cfg, hydra_cfg, run_dir)  # +logger=mlflow without MLflow: a UserError before any work
        if cfg.resume:
            cfg = resumed_config(os.path.abspath(cfg.resume), hydra_cfg.overrides.task)
        else:
            share_cores(cfg, hydra_cfg)
        interrupts.fault_point("starting")
        spec = prepare(cfg, run_dir)
        if not cfg.resume and spec.placement.chief:
            save_config(cfg, run_dir)  # the config resume= continues
        result = run(spec)
    except interrupts.Interrupted as stop:
        stopped = _interrupted(stop, cfg, run_dir)
        if status is not None:
            status.interrupted(stopped)
        _log_to_files_only("error: {}".format(stopped))
        _track(tracker, spec, INTERRUPTED, stopped)
        raise stopped  # run.py ends the process (and a sweep, with its report)
    except Exception as err:
        if status is not None:
            status.failed(err)
        _track(tracker, spec, FAILED, err)
        if multirun:
            return _failed_job(err, hydra_cfg)
        if not isinstance(err, UserError):
            raise
        _log_to_files_only("error: {}".format(err))
        sys.stderr.write("error: {}\n".format(err))
        sys.exit(2)
    if status is not None:
        status.completed(result)
    _track(tracker, spec, COMPLETED)
    return result


def _track(tracker, spec, outcome, error=None):
    """The run folder into the tracking store, by the chief only (or by any process when the job failed before
    it knew its place); after status.json, so logging cannot change the job's status."""
    if tracker is not None and (spec is None or spec.placement.chief):
        tracker.log_run(outcome, error)


def _failed_job(err, hydra_cfg):
    """A sweep job's failure: logged in its run.log, NaN to the sweeper, and the other jobs go on.

    A job stopped by SIGTERM/SIGINT is an Interrupted instead: it ends the whole sweep (see run.py).
    """
    if isinstance(err, UserError):
        log.error("error: %s", err)
    else:
        log.exception("job %s failed", hydra_cfg.job.get("num"))
    return float("nan")


def _interrupted(stop, cfg, run_dir):
    """stop with what to do next: resume a training run that saved its config; run anything else again."""
    resumable = os.path.isfile(os.path.join(run_dir, run_folder.SAVED_CONFIG))
    if cfg.mode in (Mode.train, Mode.train_eval) and resumable:
        hint = "`python run.py resume={}` continues".format(run_dir)
    elif cfg.mode in (Mode.train, Mode.train_eval):
        hint = "it had not started; run the same command again"
    else:
        hint = "nothing was written; run the same command again"
    return interrupts.Interrupted(stop.signum, "{}; {}".format(stop, hint))


def _log_to_files_only(message):
    """The run's log file gets the error too, without repeating it on the console."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
