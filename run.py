"""Entry point: `python run.py [overrides]`, `python run.py -m sweep=overrides`."""
import hydra
from omegaconf import DictConfig, OmegaConf

from effnet_exp.config import register_configs
from effnet_exp.resume import pick_run_dir

register_configs()
OmegaConf.register_new_resolver("run_dir", pick_run_dir)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from effnet_exp.experiment import run_from_hydra

    return run_from_hydra(cfg)


if __name__ == "__main__":
    main()
