"""The run object: turns the composed config into a data source, a trainer and an evaluator, and runs them."""
import logging
import os
import random
import sys

import numpy as np
from omegaconf import OmegaConf

from effnet_exp.config import Mode
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)


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

        cfg = self.cfg
        check_device_available(cfg.device)
        if cfg.mode == Mode.eval and not cfg.eval.checkpoint:
            raise UserError("mode=eval needs eval.checkpoint=<checkpoint prefix or run folder>")
        if cfg.train.batch_size < 1 or cfg.eval.batch_size < 1:
            raise UserError("train.batch_size and eval.batch_size must be at least 1")
        if cfg.train.steps is None and cfg.train.epochs is None:
            raise UserError("set train.steps or train.epochs")
        if self.image_size < 32:
            raise UserError("image size {} is too small: EfficientNet downsamples by 32".format(self.image_size))
        from effnet_exp.training.optimizers import OPTIMIZERS
        if cfg.optimizer.name not in OPTIMIZERS:
            raise UserError("optimizer.name={!r} is not one of {}".format(cfg.optimizer.name, ", ".join(OPTIMIZERS)))
        if cfg.dataset.normalization not in ("imagenet", "unit"):
            raise UserError("dataset.normalization={!r} is not one of imagenet, unit".format(
                cfg.dataset.normalization))

    def run(self):
        from effnet_exp.data.source import resolve_data_source
        from effnet_exp.devices.session import make_session_config
        from effnet_exp.training.checkpoints import resolve_checkpoint

        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        checkpoint = resolve_checkpoint(cfg.eval.checkpoint) if cfg.mode == Mode.eval else None
        source = resolve_data_source(cfg.dataset, need_train=cfg.mode != Mode.eval,
                                     need_eval=cfg.mode != Mode.train)
        if source.class_names:
            from effnet_exp.run_files import atomic_write_text
            atomic_write_text(os.path.join(self.run_dir, "labels.txt"), "\n".join(source.class_names) + "\n")
        session_config = make_session_config(cfg.device)
        log.info("run folder %s; model %s at %dx%d, %d classes; data %s", self.run_dir, cfg.model.name,
                 self.image_size, self.image_size, cfg.model.num_classes, source.data_dir)
        result = None
        if cfg.mode in (Mode.train_eval, Mode.train):
            from effnet_exp.training.trainer import Trainer
            trained = Trainer(cfg, source, self.run_dir, session_config, self.image_size).train()
            checkpoint = trained["checkpoint"]
            result = trained.get("top1")
        if cfg.mode in (Mode.train_eval, Mode.eval):
            from effnet_exp.training.evaluator import Evaluator
            result = Evaluator(cfg, source, self.run_dir, session_config, self.image_size).evaluate(
                checkpoint)["top1"]
            print("eval top1 {:.4f}".format(result))
        return float(result) if result is not None else float("nan")


def run_from_hydra(cfg):
    """The body of run.py's @hydra.main: returns the final eval top-1 for sweepers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    try:
        return Experiment(cfg, hydra_cfg.runtime.output_dir).run()
    except UserError as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            log.error("%s", err)
            raise
        _log_to_files_only("error: {}".format(err))
        sys.stderr.write("error: {}\n".format(err))
        sys.exit(2)


def _log_to_files_only(message):
    """The run's log file gets the error too, without repeating it on the console."""
    record = logging.LogRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
