"""The composed run config: one typed schema per config group, registered in Hydra's ConfigStore.

Importing this module never imports TensorFlow, so Hydra rejects bad keys and values before any graph work.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from effnet_exp.data.config import DatasetConfig
from effnet_exp.errors import UserError
from effnet_exp.devices.config import AscendDeviceConfig, CpuDeviceConfig, GpuDeviceConfig
from effnet_exp.export.config import ExportConfig
from effnet_exp.model.config import ModelConfig
from effnet_exp.modes import Mode
from effnet_exp.training.config import EvalConfig, OptimizerConfig, PredictConfig, TrainConfig


@dataclass
class MlflowLoggerConfig:
    """+logger=mlflow (conf/logger/mlflow.yaml): each job's results into an MLflow store once the job has ended."""
    name: str = "mlflow"
    # A folder (relative to the directory run.py starts in) or an MLflow tracking URI (file:/..., http://...)
    tracking_uri: str = "mlruns"
    # null: a sweep job's sweep folder (multirun_sweeps/<date>/<time>), "effnet_exp" for a single run.
    experiment: Optional[str] = None


@dataclass
class RunConfig:
    mode: Mode = Mode.train_eval
    seed: int = 0
    # A run folder to continue: its saved config, with this command line's key=value overrides on top.
    resume: Optional[str] = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Each device yaml pulls in its own schema (cpu, gpu and ascend take different fields).
    device: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # Not in the defaults list: `+logger=mlflow` adds conf/logger/mlflow.yaml, which pulls in its schema.
    logger: Any = None


def requested_image_size(cfg):
    """The input size the config asks for: model.image_size, else the dataset's suggestion, else the variant's."""
    return cfg.model.image_size or cfg.dataset.image_size or cfg.model.resolution


DEVICE_SCHEMAS = {"cpu": CpuDeviceConfig, "gpu": GpuDeviceConfig, "ascend": AscendDeviceConfig}


def register_configs():
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="dataset", name="dataset_schema", node=DatasetConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optimizer", name="optimizer_schema", node=OptimizerConfig)
    cs.store(group="device", name="cpu_schema", node=CpuDeviceConfig)
    cs.store(group="device", name="gpu_schema", node=GpuDeviceConfig)
    cs.store(group="device", name="ascend_schema", node=AscendDeviceConfig)
    cs.store(group="logger", name="mlflow_schema", node=MlflowLoggerConfig)


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def compose_run_config(overrides, tool_overrides=()):
    """The RunConfig (typed) that `python run.py <tool_overrides> <overrides>` would compose, for the tools that
    take run.py's overrides outside a Hydra run; UserError naming the user's overrides and Hydra's first line."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return OmegaConf.to_object(compose(config_name="config",
                                               overrides=list(tool_overrides) + list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError("overrides {}: {}".format(" ".join(overrides), str(err).splitlines()[0]))
    finally:
        GlobalHydra.instance().clear()
