"""The real run config for tests: conf/ composed by Hydra with overrides, as typed schema dataclasses.

Tests build their configs here instead of SimpleNamespace stand-ins, so a misspelt field fails loudly.
"""
import os

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from effnet_exp.config import register_configs

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def run_config(*overrides):
    """RunConfig (dataclasses, Enums resolved) of `python run.py <overrides>`."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
    return OmegaConf.to_object(cfg)


def section(name, *overrides):
    """One section of run_config: section("dataset", "dataset.num_classes=3")."""
    return getattr(run_config(*overrides), name)
