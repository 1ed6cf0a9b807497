"""The run spec: everything a run needs that is derived from config + data + checkpoint, resolved once.

The config object is never changed after this; what differs from it (the class count taken from the data, the
model of a checkpoint's run folder, ...) lives here.
"""
import dataclasses
import logging
import math
import os
from typing import Any, List, Optional

from omegaconf import OmegaConf

from effnet_exp import run_folder
from effnet_exp.config import requested_image_size
from effnet_exp.data.config import Normalization
from effnet_exp.data.imagenet_classes import imagenet_class_names
from effnet_exp.data.source import resolve_data_source
from effnet_exp.errors import UserError
from effnet_exp.export.config import needs_data
from effnet_exp.inference.artifacts import artifact_format, artifact_manifest
from effnet_exp.model.config import ModelConfig
from effnet_exp.model.restore import checkpoint_num_classes, resolve_weights
from effnet_exp.modes import INFERENCE_MODES, TRAINING_MODES, Mode
from effnet_exp.training.checkpoints import checkpoint_step
from effnet_exp.training.class_weights import resolve_class_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunSpec:
    cfg: Any                    # the RunConfig, as validated
    device: Any                 # the Device (effnet_exp/devices)
    run_dir: str                # the run folder (the chief's)
    own_dir: str                # where this process writes (the run folder, or its rank_k/worker_k sub-folder)
    model: ModelConfig          # cfg.model, or the model of eval.checkpoint's run, with the class count resolved
    image_size: int
    normalization: Normalization
    class_names: Optional[List[str]]
    use_ema: bool               # read the /ExponentialMovingAverage weights of a checkpoint that has them
    source: Any = None          # the DataSource (train and eval modes)
    checkpoint: Optional[str] = None         # eval / predict / export: the checkpoint prefix of eval.checkpoint
    initial_weights: Optional[str] = None    # train: model.pretrained's checkpoint prefix
    resume_checkpoint: Optional[str] = None  # train: the run folder's latest checkpoint, which every process resumes
    resume_step: int = 0
    total_steps: int = 0
    steps_per_epoch: float = 0.0
    class_weights: Optional[List[float]] = None  # train: the loss weight of each class (train.class_weights)

    @property
    def placement(self):
        return self.device.placement

    @property
    def evaluates(self):
        """Whether this process evaluates (the final evaluation, or train.eval_every); only the chief does."""
        mode = self.cfg.mode
        return self.placement.chief and (mode != Mode.train or bool(self.cfg.train.eval_every))


def resolve_spec(cfg, device, run_dir, own_dir):
    if cfg.mode in INFERENCE_MODES:
        spec = _checkpoint_spec(cfg, device, run_dir, own_dir)
    else:
        spec = _training_spec(cfg, device, run_dir, own_dir)
    if cfg.mode in (Mode.eval,) + TRAINING_MODES:
        spec = _with_data(spec)
    elif cfg.mode == Mode.export and needs_data(cfg.export):  # int8 calibration, the export report
        spec = dataclasses.replace(spec, source=resolve_data_source(cfg.dataset, need_train=True, need_eval=True))
    log.info("run folder %s; model %s at %dx%d, %d classes, %s normalisation", own_dir, spec.model.name,
             spec.image_size, spec.image_size, spec.model.num_classes, spec.normalization.value)
    return spec


def _training_spec(cfg, device, run_dir, own_dir):
    resume = run_folder.latest_checkpoint(run_folder.checkpoint_dir(run_dir))
    resume_step = checkpoint_step(resume) if resume else 0
    if resume:
        log.info("resuming from %s: the input stream continues after %d steps of global batch %d", resume,
                 resume_step, cfg.train.batch_size)
    pretrained = resolve_weights(cfg.model.pretrained, cfg.dataset.cache_dir) if cfg.model.pretrained else None
    return RunSpec(cfg=cfg, device=device, run_dir=run_dir, own_dir=own_dir, model=cfg.model,
                   image_size=requested_image_size(cfg), normalization=_normalization(cfg.model, cfg.dataset),
                   class_names=None, use_ema=cfg.model.pretrained_weights == "ema", initial_weights=pretrained,
                   resume_checkpoint=resume, resume_step=resume_step)


def _checkpoint_spec(cfg, device, run_dir, own_dir):
    """eval / predict / export: eval.checkpoint's run folder brings the model (and class names) that made it;
    an exported artifact (.pb, saved_model/, .tflite) brings them in its export.json."""
    use_ema = {Mode.eval: cfg.eval.use_ema, Mode.predict: cfg.model.pretrained_weights == "ema",
               Mode.export: cfg.export.use_ema}[cfg.mode]
    fmt = artifact_format(cfg.eval.checkpoint)
    if fmt and cfg.mode == Mode.export:
        raise UserError("eval.checkpoint={} is an exported {}: mode=export needs the checkpoint (or run folder) it "
                        "came from".format(cfg.eval.checkpoint, fmt))
    if fmt:
        checkpoint = os.path.abspath(os.path.expanduser(cfg.eval.checkpoint))
        model, image_size, normalization, class_names = _artifact_model(cfg.model, checkpoint, fmt)
    else:
        checkpoint = resolve_weights(cfg.eval.checkpoint, cfg.dataset.cache_dir)
        model, image_size, normalization, class_names = _checkpoint_model(cfg, checkpoint)
    if cfg.mode == Mode.eval and model.num_classes != cfg.dataset.num_classes:
        raise UserError("the checkpoint's model has {} classes but dataset.num_classes={}".format(
            model.num_classes, cfg.dataset.num_classes))
    if cfg.mode != Mode.eval and not class_names and model.num_classes == 1000:
        class_names = imagenet_class_names()
    return RunSpec(cfg=cfg, device=device, run_dir=run_dir, own_dir=own_dir, model=model, image_size=image_size,
                   normalization=normalization, class_names=class_names, use_ema=use_ema, checkpoint=checkpoint)


def _checkpoint_model(cfg, checkpoint):
    """(model config, image size, normalization, class names) for a checkpoint."""
    trained_in = run_folder.run_folder_of(checkpoint)
    if trained_in:
        model, image_size, normalization = _saved_model(trained_in)
        log.info("model %s at %d px and %s normalisation, as trained in %s", model.name, image_size,
                 normalization.value, trained_in)
        class_names = run_folder.saved_class_names(
            trained_in, model.num_classes or checkpoint_num_classes(checkpoint, model.name))
    elif cfg.mode == Mode.eval:
        model, image_size, class_names = cfg.model, requested_image_size(cfg), None
        normalization = _normalization(cfg.model, cfg.dataset)
    else:  # predict / export: no dataset is involved, the model's own size and the checkpoint's class count
        found = checkpoint_num_classes(checkpoint, cfg.model.name)
        model = dataclasses.replace(cfg.model, num_classes=found) if found else cfg.model
        image_size, class_names = cfg.model.image_size or cfg.model.resolution, None
        normalization = _normalization(cfg.model, cfg.dataset)
    return model, image_size, normalization, class_names


def _artifact_model(model_cfg, path, fmt):
    """(model config, image size, normalization, class names) of an exported artifact, from its export.json."""
    manifest = artifact_manifest(path)
    model = dataclasses.replace(model_cfg, name=manifest["model"], num_classes=int(manifest["num_classes"]),
                                image_size=int(manifest["image_size"]))
    log.info("%s %s: model %s at %d px and %s normalisation, as exported from %s", fmt, path, model.name,
             model.image_size, manifest["normalization"]["name"], manifest.get("checkpoint"))
    return (model, model.image_size, Normalization(manifest["normalization"]["name"]),
            manifest.get("class_names") or None)


def _with_data(spec):
    """The DataSource, the class count and names it brings, and the step total."""
    cfg = spec.cfg
    source = resolve_data_source(cfg.dataset, need_train=cfg.mode != Mode.eval, need_eval=spec.evaluates)
    model = spec.model
    if not cfg.dataset.num_classes and source.num_classes and not model.num_classes:  # 0: as many as the data has
        model = dataclasses.replace(model, num_classes=source.num_classes)
    changes = dict(source=source, model=model, class_names=source.class_names or spec.class_names)
    if cfg.mode in TRAINING_MODES:
        changes.update(steps_per_epoch=source.num_train / float(cfg.train.batch_size),
                       total_steps=_step_total(cfg.train, source.num_train, spec.device.steps_per_run),
                       class_weights=resolve_class_weights(cfg.train, source, cfg.dataset, model.num_classes,
                                                           source.class_names))
    return dataclasses.replace(spec, **changes)


def _step_total(train_cfg, num_train, steps_per_run):
    """train.steps, else train.epochs of the global batch, rounded up to whole device loops."""
    if train_cfg.steps is not None:
        return int(train_cfg.steps)
    total = int(math.ceil(train_cfg.epochs * num_train / float(train_cfg.batch_size)))
    if total % steps_per_run:
        rounded = int(math.ceil(total / float(steps_per_run))) * steps_per_run
        log.info("train.epochs=%g gives %d steps: rounded up to %d, a multiple of device.iterations_per_loop=%d",
                 train_cfg.epochs, total, rounded, steps_per_run)
        total = rounded
    return total


def _normalization(model_cfg, dataset_cfg):
    """The weights' expected input scaling travels with the model (e.g. Lite: (x - 127) / 128)."""
    return Normalization(model_cfg.normalization or dataset_cfg.normalization)


def _saved_model(run_dir):
    """(model config, image size, normalization) of the run that trained in run_dir."""
    model, dataset = run_folder.saved_sections(run_dir)
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), model))
    image_size = model_cfg.image_size or dataset.get("image_size") or model_cfg.resolution
    return model_cfg, image_size, Normalization(model_cfg.normalization or dataset.get("normalization"))
