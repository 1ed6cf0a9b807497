"""Entry point: `python run.py [overrides]`, `python run.py -m sweep=overrides`."""
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from effnet_exp import interrupts
from effnet_exp.config import register_configs
from effnet_exp.reporting.console import quiet_console
from effnet_exp.reporting.hydra_callback import sweep_exit_status, sweep_interrupted
from effnet_exp.resume import pick_run_dir

register_configs()
# Launchers that start fresh interpreters (submitit_local, submitit_slurm) import effnet_exp there by name.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if p)
OmegaConf.register_new_resolver("run_dir", pick_run_dir)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    quiet_console()
    # Imported after quiet_console(), which loads TensorFlow with the console's settings.
    from effnet_exp.experiment import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    interrupts.install()
    try:
        main()
    except interrupts.Interrupted as stop:  # a signal outside a job: before it, after it, between sweep jobs
        sys.exit(sweep_interrupted(stop))
    # A sweep whose jobs all ran but some failed (see its summary.md) ends with a non-zero status.
    sys.exit(sweep_exit_status())
