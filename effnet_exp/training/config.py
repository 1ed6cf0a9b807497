"""Typed schemas of the `optimizer` group and the `train` / `eval` sections (no TensorFlow import here)."""
from dataclasses import dataclass
from typing import Optional


@dataclass
class OptimizerConfig:
    name: str = "sgd_nesterov"  # sgd_nesterov | momentum | rmsprop | adam | sgd
    lr: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    # RMSProp decay (rho).
    decay: float = 0.9
    epsilon: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999


@dataclass
class TrainConfig:
    batch_size: int = 50
    # train.steps wins over train.epochs when both are set.
    epochs: Optional[float] = 1.0
    steps: Optional[int] = None
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoint_max: int = 5


@dataclass
class EvalConfig:
    batch_size: int = 50
    # Checkpoint prefix, or a run folder (its latest checkpoint); mode=eval needs it.
    checkpoint: Optional[str] = None
