"""`python run.py resume=<run folder> [key=value ...]`: the run's saved config, new overrides on top."""
import logging
import os

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from effnet_exp.config import DEVICE_SCHEMAS, RunConfig
from effnet_exp.errors import UserError
from effnet_exp.run_folder import HYDRA_CONFIG, SAVED_CONFIG, atomic_write_text

log = logging.getLogger(__name__)

GROUPS = ("dataset", "model", "optimizer", "device", "experiment")


def typed_config(saved, path):
    """The saved config under the run schema again, so overrides are type-checked as on a first start."""
    schema = OmegaConf.structured(RunConfig)
    device = saved.get("device", {}).get("name")
    if device not in DEVICE_SCHEMAS:
        raise UserError("{}: device.name={!r} is not one of {}".format(path, device, ", ".join(DEVICE_SCHEMAS)))
    schema.device = OmegaConf.structured(DEVICE_SCHEMAS[device])
    return OmegaConf.merge(schema, saved)


def pick_run_dir(resume, default):
    """hydra.run.dir: the resumed run's own folder, else a new one."""
    if resume and not os.path.isdir(resume):
        raise ValueError("resume={}: no such run folder".format(resume))
    return resume if resume else default


def save_config(cfg, run_dir):
    """The run's resolved config, kept beside Hydra's files (which Hydra rewrites on every start)."""
    path = os.path.join(run_dir, SAVED_CONFIG)
    if not os.path.exists(path):
        atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))


def resumed_config(run_dir, overrides):
    """The config saved at the run's first start, with the command line's key=value overrides applied."""
    path = os.path.join(run_dir, SAVED_CONFIG)
    if not os.path.isfile(path):
        raise UserError("resume={} is not a run folder of effnet-exp (no {})".format(run_dir, SAVED_CONFIG))
    cfg = typed_config(OmegaConf.load(path), path)
    applied = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        # Tracking is chosen per command: experiment.py takes `logger` from this command line's composed config.
        if key == "resume" or key.startswith("hydra.") or key.split(".")[0] == "logger":
            continue
        if key in GROUPS:
            raise UserError("resume keeps the run's {0} config; {0}={1} cannot change it (start a new run "
                            "instead)".format(key, override.value()))
        if override.is_delete():
            raise UserError("resume cannot delete {}".format(key))
        try:
            OmegaConf.update(cfg, key, override.value(), merge=True)
        except Exception as err:  # OmegaConf's validation errors name the key and value
            raise UserError("resume: cannot apply {}: {}".format(key, str(err).splitlines()[0]))
        applied.append("{}={}".format(key, override.value()))
    cfg.resume = run_dir
    log.info("resuming %s with its saved config%s", run_dir,
             "; overrides applied on top: " + ", ".join(applied) if applied else "")
    atomic_write_text(os.path.join(run_dir, HYDRA_CONFIG), OmegaConf.to_yaml(cfg))
    return cfg
