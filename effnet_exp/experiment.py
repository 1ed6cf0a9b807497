"""The run object: turns the composed config into a data source, a trainer, an evaluator or a predictor."""
import dataclasses
import logging
import os
import random
import sys

import numpy as np
from omegaconf import OmegaConf

from effnet_exp.config import Mode
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)

NORMALIZATIONS = ("imagenet", "unit", "lite")


def model_image_size(cfg):
    return cfg.model.image_size or cfg.dataset.image_size or cfg.model.resolution


class Experiment(object):
    """One run: validates everything it can before touching TensorFlow graphs or the run folder."""

    def __init__(self, cfg, run_dir):
        self.cfg = OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else cfg
        self.run_dir = os.path.abspath(run_dir)
        self.image_size = model_image_size(self.cfg)
        self._validate()

    def _validate(self):
        from effnet_exp.devices.session import check_device_available
        from effnet_exp.training.optimizers import OPTIMIZERS

        cfg = self.cfg
        check_device_available(cfg.device)
        if cfg.mode in (Mode.eval, Mode.predict, Mode.export) and not cfg.eval.checkpoint:
            raise UserError("mode={} needs eval.checkpoint=<checkpoint prefix, run folder or "
                            "package:<variant>>".format(cfg.mode.value))
        if cfg.mode == Mode.predict and not cfg.predict.images:
            raise UserError("mode=predict needs predict.images=[a.jpg,b.png]")
        if cfg.mode == Mode.export:
            from effnet_exp.export.config import check_export
            check_export(cfg.export)
        if cfg.train.batch_size < 1 or cfg.eval.batch_size < 1:
            raise UserError("train.batch_size and eval.batch_size must be at least 1")
        if cfg.train.steps is None and cfg.train.epochs is None:
            raise UserError("set train.steps or train.epochs")
        if self.image_size < 32:
            raise UserError("image size {} is too small: EfficientNet downsamples by 32".format(self.image_size))
        if cfg.optimizer.name not in OPTIMIZERS:
            raise UserError("optimizer.name={!r} is not one of {}".format(cfg.optimizer.name, ", ".join(OPTIMIZERS)))
        from effnet_exp.training.optimizers import check_training_config
        check_training_config(cfg)  # schedule, recipe and device-loop fields
        from effnet_exp.devices.strategy import check_strategy_config
        check_strategy_config(cfg)  # device.strategy: replicas, TF_CONFIG, the batch split, what it cannot do
        for key, value in (("dataset.normalization", cfg.dataset.normalization),
                           ("model.normalization", cfg.model.normalization)):
            if value is not None and value not in NORMALIZATIONS:
                raise UserError("{}={!r} is not one of {}".format(key, value, ", ".join(NORMALIZATIONS)))
        if cfg.train.nonfinite_policy not in ("stop", "skip"):
            raise UserError("train.nonfinite_policy={!r} is not one of stop, skip".format(
                cfg.train.nonfinite_policy))
        if cfg.model.pretrained_weights not in ("ema", "raw"):
            raise UserError("model.pretrained_weights={!r} is not one of ema, raw".format(
                cfg.model.pretrained_weights))

    def run(self):
        from effnet_exp.devices.session import make_session_config

        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # The weights' expected input scaling travels with the model (e.g. Lite: (x - 127) / 128).
        if cfg.model.normalization:
            cfg.dataset = dataclasses.replace(cfg.dataset, normalization=cfg.model.normalization)
        session_config = make_session_config(cfg.device)
        if cfg.mode == Mode.predict:
            return self._predict(session_config)
        if cfg.mode == Mode.export:
            return self._export(session_config)
        checkpoint, class_names = None, None
        if cfg.mode == Mode.eval:
            checkpoint, class_names = self._checkpoint_model()
        pretrained = None
        if cfg.mode != Mode.eval and cfg.model.pretrained:
            from effnet_exp.model.restore import resolve_weights
            pretrained = resolve_weights(cfg.model.pretrained, cfg.dataset.cache_dir)

        from effnet_exp.data.source import resolve_data_source
        from effnet_exp.training.evaluator import Evaluator

        from effnet_exp.devices.ascend_env import is_chief
        chief = is_chief(cfg.device)  # data-parallel ranks other than 0 train only (no checkpoints, no eval.json)
        evaluates = (cfg.mode != Mode.train or bool(cfg.train.eval_every)) and chief
        source = resolve_data_source(cfg.dataset, need_train=cfg.mode != Mode.eval, need_eval=evaluates)
        if not cfg.dataset.num_classes and source.num_classes:  # 0: as many classes as the data has
            cfg.dataset = dataclasses.replace(cfg.dataset, num_classes=source.num_classes)
            if not cfg.model.num_classes:
                cfg.model = dataclasses.replace(cfg.model, num_classes=source.num_classes)
        self._write_labels(source.class_names or class_names)
        log.info("run folder %s; model %s at %dx%d, %d classes; data %s", self.run_dir, cfg.model.name,
                 self.image_size, self.image_size, cfg.model.num_classes, source.data_dir)
        evaluator = Evaluator(cfg, source, self.run_dir, session_config, self.image_size) if evaluates else None
        result, trained = None, {}
        if cfg.mode in (Mode.train_eval, Mode.train):
            from effnet_exp.training.trainer import Trainer
            trained = Trainer(cfg, source, self.run_dir, session_config, self.image_size, pretrained=pretrained,
                              evaluate=evaluator.evaluate if evaluator else None).train()
            checkpoint = trained["checkpoint"]
            result = trained.get("top1")
        if cfg.mode in (Mode.train_eval, Mode.eval) and chief:
            result = (trained.get("eval") if cfg.mode == Mode.train_eval else None) or evaluator.evaluate(checkpoint)
            result = result["top1"]
            print("eval top1 {:.4f}".format(result))
        if cfg.mode in (Mode.train_eval, Mode.train):
            from effnet_exp.reporting.curves import update_curves
            update_curves(self.run_dir)  # the final curves.png, with the final evaluation
        return float(result) if result is not None else float("nan")

    def _checkpoint_model(self):
        """Resolves eval.checkpoint; a run folder's checkpoint brings the model (and class names) that made it."""
        from effnet_exp.model.config import ModelConfig
        from effnet_exp.model.restore import checkpoint_num_classes, resolve_weights
        from effnet_exp.run_folder import run_folder_of, saved_class_names, saved_model_config

        cfg = self.cfg
        checkpoint = resolve_weights(cfg.eval.checkpoint, cfg.dataset.cache_dir)
        run_dir = run_folder_of(checkpoint)
        if run_dir:
            cfg.model, self.image_size, normalization = saved_model_config(run_dir, ModelConfig)
            cfg.dataset = dataclasses.replace(cfg.dataset, normalization=normalization)
            log.info("model %s at %d px and %s normalisation, as trained in %s", cfg.model.name,
                     self.image_size, normalization, run_dir)
            class_names = saved_class_names(run_dir)
        else:
            class_names = None
            if cfg.mode in (Mode.predict, Mode.export):
                # No dataset is involved: the model's own size and class count, not the dataset's.
                self.image_size = cfg.model.image_size or cfg.model.resolution
                found = checkpoint_num_classes(checkpoint, cfg.model.name)
                if found:
                    cfg.model = dataclasses.replace(cfg.model, num_classes=found)
        if cfg.mode == Mode.eval and cfg.model.num_classes != cfg.dataset.num_classes:
            raise UserError("the checkpoint's model has {} classes but dataset.num_classes={}".format(
                cfg.model.num_classes, cfg.dataset.num_classes))
        return checkpoint, class_names

    def _predict(self, session_config):
        from effnet_exp.inference.predictor import Predictor, report
        from effnet_exp.model.config import Weights

        cfg = self.cfg
        checkpoint, class_names = self._checkpoint_model()
        class_names = self._inference_class_names(class_names)
        results = Predictor(cfg.model, self.image_size, cfg.dataset.normalization, cfg.dataset.crop_padding,
                            class_names, session_config).predict(
            checkpoint, list(cfg.predict.images), cfg.predict.top_k, cfg.model.pretrained_weights == Weights.ema)
        failed = report(results, self.run_dir)
        if failed:
            raise UserError("{} of {} images could not be predicted (see predictions.json)".format(
                failed, len(results)))
        return float(len(results))

    def _export(self, session_config):
        from effnet_exp.export.exporter import export_model, summary_text

        cfg = self.cfg
        checkpoint, class_names = self._checkpoint_model()
        class_names = self._inference_class_names(class_names)
        manifest = export_model(checkpoint, cfg.model, self.image_size, cfg.dataset.normalization, self.run_dir,
                                cfg.export, class_names=class_names, crop_padding=cfg.dataset.crop_padding,
                                session_config=session_config)
        print(summary_text(manifest))
        return float(len(manifest["files"]))

    def _inference_class_names(self, class_names):
        """The run's labels, else ImageNet's for a 1000-class model; written to labels.txt."""
        if not class_names and self.cfg.model.num_classes == 1000:
            from effnet_exp.data.imagenet_classes import imagenet_class_names
            class_names = imagenet_class_names()
        self._write_labels(class_names)
        return class_names

    def _write_labels(self, class_names):
        if class_names:
            from effnet_exp.run_files import atomic_write_text
            atomic_write_text(os.path.join(self.run_dir, "labels.txt"), "\n".join(class_names) + "\n")


def run_from_hydra(cfg):
    """The body of run.py's @hydra.main: returns the final eval top-1 for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from effnet_exp.reporting.jobs import JobStatus, share_cores
    from effnet_exp.resume import resumed_config, save_config

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    # Sweep jobs (and a resumed sweep job) record running / completed / failed for the sweep report.
    status = JobStatus.open(run_dir, hydra_cfg, multirun)
    try:
        if cfg.resume:
            cfg = resumed_config(os.path.abspath(cfg.resume), hydra_cfg.overrides.task)
        from effnet_exp.devices.strategy import worker_run_dir
        own_dir = worker_run_dir(run_dir, cfg.device)  # a multi_worker task other than the chief: its own folder
        if not cfg.resume:
            share_cores(cfg, hydra_cfg)
            if own_dir == run_dir:  # the chief's saved config is the job's (resume= reads it)
                save_config(cfg, run_dir)
        run_dir = own_dir
        result = Experiment(cfg, run_dir).run()
    except Exception as err:
        if status is not None:
            status.failed(err)
        if multirun:
            return _failed_job(err, hydra_cfg)
        if not isinstance(err, UserError):
            raise
        _log_to_files_only("error: {}".format(err))
        sys.stderr.write("error: {}\n".format(err))
        sys.exit(getattr(err, "exit_code", 2))
    if status is not None:
        status.completed(result)
    return result


def _failed_job(err, hydra_cfg):
    """A sweep job's failure: logged in its run.log, NaN to the sweeper, and the other jobs go on.

    A job stopped by SIGTERM/SIGINT stops the whole sweep (exit 128 + signal) after writing its report.
    """
    if isinstance(err, UserError):
        log.error("error: %s", err)
    else:
        log.exception("job %s failed", hydra_cfg.job.get("num"))
    code = getattr(err, "exit_code", 2)
    if code > 128:
        from effnet_exp.reporting.hydra_callback import report_sweep

        report_sweep(hydra_cfg.sweep.dir)
        sys.stderr.write("error: {}\n".format(err))
        sys.exit(code)
    return float("nan")


def _log_to_files_only(message):
    """The run's log file gets the error too, without repeating it on the console."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
