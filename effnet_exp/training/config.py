"""Typed schemas of the `optimizer` group and the `train` / `eval` sections (no TensorFlow import here)."""
from dataclasses import dataclass, field
from typing import List, Optional


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
    # Checkpoints every N steps and/or every T minutes, and at the end; the newest keep_checkpoint_max kept.
    checkpoint_every: int = 1000
    checkpoint_every_minutes: Optional[float] = None
    keep_checkpoint_max: int = 5
    # Evaluate every N steps; the best checkpoint by eval top-1 is kept in checkpoints/best/.
    eval_every: Optional[int] = None
    # A NaN/Inf loss: "stop" at once, or "skip" the update and stop after max_nonfinite_steps in a row.
    nonfinite_policy: str = "stop"
    max_nonfinite_steps: int = 5
    # Fine-tuning: train only the classifier head, and/or keep batch norm in inference mode.
    freeze_backbone: bool = False
    freeze_bn: bool = False


@dataclass
class PredictConfig:
    images: List[str] = field(default_factory=list)
    top_k: int = 5


@dataclass
class EvalConfig:
    batch_size: int = 50
    # Checkpoint prefix, or a run folder (its latest checkpoint); mode=eval needs it.
    checkpoint: Optional[str] = None
