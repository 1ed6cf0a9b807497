"""Typed schemas of the `optimizer` group and the `train` / `eval` / `predict` sections, and their checks (no
TensorFlow import here)."""
import enum
from dataclasses import dataclass, field
from typing import Any, List, Optional

from effnet_exp.errors import UserError


class ScheduleName(str, enum.Enum):
    constant = "constant"
    exponential = "exponential"
    cosine = "cosine"


class OptimizerName(str, enum.Enum):
    sgd_nesterov = "sgd_nesterov"
    momentum = "momentum"
    rmsprop = "rmsprop"
    adam = "adam"
    sgd = "sgd"


class NonFinitePolicy(str, enum.Enum):
    stop = "stop"
    skip = "skip"


@dataclass
class ScheduleConfig:
    """optimizer.schedule: the learning rate as a function of the global step (effnet_exp/training/schedules.py)."""
    # constant | exponential (the reference: optional linear warmup, then lr * decay_rate^(epoch / decay_epochs))
    # | cosine (optional linear warmup, then half a cosine from lr down to 0 at the last step).
    name: ScheduleName = ScheduleName.constant
    # Linear warmup from 0 over this many epochs (any schedule).
    warmup_epochs: float = 0.0
    # exponential: multiply by decay_rate every decay_epochs (staircase: in whole steps of decay_epochs).
    decay_epochs: float = 2.4
    decay_rate: float = 0.97
    staircase: bool = True
    # optimizer.lr is per scale_batch images: lr = optimizer.lr * global batch / scale_batch. 0: lr as given.
    scale_batch: int = 0


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd_nesterov
    lr: float = 1e-4
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    momentum: float = 0.9
    nesterov: bool = True
    # RMSProp decay (rho).
    decay: float = 0.9
    epsilon: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999


# train.class_weights=balanced: the weights from the training split's class counts.
BALANCED = "balanced"


@dataclass
class EarlyStoppingConfig:
    """train.early_stopping: stop when eval top-1 (every train.eval_every steps) has not improved by more than
    min_delta over the best so far for `patience` evaluations in a row (effnet_exp/training/early_stopping.py)."""
    # Evaluations without such an improvement before training stops; null or 0: never stop early.
    patience: Optional[int] = None
    min_delta: float = 0.0


@dataclass
class ProgressiveConfig:
    """train.progressive: the EfficientNetV2 paper's progressive learning (effnet_exp/training/progressive.py). The run's
    steps are cut into `stages` equal shares; the training image size grows linearly from min_image_size to the
    run's image size, and with it RandAugment's magnitude, MixUp's alpha and the dropout rate from their min_ values
    here to their values in dataset.randaugment.magnitude, train.mixup_alpha and model.dropout_rate."""
    # 0: off (one stage at the run's image size). The paper and the authors' code use 4.
    stages: int = 0
    # The first stage's image size; null: half the run's image size (at least 32), the authors' code's fallback
    # when its base size data.ibase (128 for ImageNet) is unset.
    min_image_size: Optional[int] = None
    min_randaugment_magnitude: float = 5.0
    min_mixup_alpha: float = 0.0
    min_dropout: float = 0.0
    # The evaluation's image size (periodic and final); null: the run's image size, as without stages.
    eval_image_size: Optional[int] = None


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
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # A NaN/Inf loss: "stop" at once, or "skip" the update and stop after max_nonfinite_steps in a row.
    nonfinite_policy: NonFinitePolicy = NonFinitePolicy.stop
    max_nonfinite_steps: int = 5
    # Fine-tuning: train only the classifier head, and/or keep batch norm in inference mode.
    freeze_backbone: bool = False
    freeze_bn: bool = False
    # The training recipe (all off by default; the reference ImageNet values in conf/experiment/reference_imagenet):
    # label smoothing of the one-hot targets (reference 0.1);
    label_smoothing: float = 0.0
    # L2 weight decay, weight_decay * sum(l2_loss(v)), on the trained kernels and biases, never on batch-norm
    # gamma/beta (reference 1e-5);
    weight_decay: float = 0.0
    # an exponential moving average of the weights and batch-norm statistics with num_updates = global step,
    # saved in the checkpoints as <var>/ExponentialMovingAverage (reference 0.9999; null: none);
    ema_decay: Optional[float] = None
    # clip the gradients to this global norm (null: no clipping).
    clip_grad_norm: Optional[float] = None
    # Mixing of the training batch (effnet_exp/training/mixing.py), with lambda ~ Beta(alpha, alpha) per batch and
    # soft targets; alpha 0: off. MixUp blends each image with its partner in the batch reversed (often 0.2-0.8);
    mixup_alpha: float = 0.0
    # CutMix pastes in a box of the partner image, lambda then the image's own share of pixels (often 1.0);
    cutmix_alpha: float = 0.0
    # with both on, a batch is cut with this probability, else blended.
    mix_switch_prob: float = 0.5
    # Weighted cross-entropy: none | balanced (N / (C x n_c) from the training split's class counts) | a list
    # [w0, w1, ...] of one weight >= 0 per class. Typed Any: Hydra takes a string or a list from the command line.
    class_weights: Any = "none"
    # Progressive learning: image size and regularisation growing over stages of the run (off by default).
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class PredictConfig:
    images: List[str] = field(default_factory=list)
    top_k: int = 5


@dataclass
class EvalConfig:
    batch_size: int = 50
    # Checkpoint prefix, or a run folder (its latest checkpoint); mode=eval needs it.
    checkpoint: Optional[str] = None
    # Evaluate the checkpoint's /ExponentialMovingAverage weights when it has them (false: the raw weights).
    use_ema: bool = True
    # predictions.jsonl in the run folder: each eval image's source, label and top-5 (what eval.json is computed from).
    save_predictions: bool = False
    # Each image's probabilities are the mean of its own and its horizontal mirror's (test-time augmentation).
    flip_tta: bool = False
    # mistakes.png: this many of the most confidently wrong eval images (0: none).
    mistakes: int = 24


def check_optimizer(cfg):
    if cfg.lr < 0:
        raise UserError("optimizer.lr={} must be >= 0".format(cfg.lr))
    schedule = cfg.schedule
    if schedule.warmup_epochs < 0:
        raise UserError("optimizer.schedule.warmup_epochs={} must be >= 0".format(schedule.warmup_epochs))
    if schedule.name == ScheduleName.exponential:
        if schedule.decay_epochs <= 0:
            raise UserError("optimizer.schedule.decay_epochs={} must be > 0".format(schedule.decay_epochs))
        if not 0 < schedule.decay_rate <= 1:
            raise UserError("optimizer.schedule.decay_rate={} must be in (0, 1]".format(schedule.decay_rate))
    if schedule.scale_batch < 0:
        raise UserError("optimizer.schedule.scale_batch={} must be >= 0 (0: no scaling)".format(
            schedule.scale_batch))


def check_train(cfg):
    if cfg.batch_size < 1:
        raise UserError("train.batch_size={} must be at least 1".format(cfg.batch_size))
    if cfg.steps is None and cfg.epochs is None:
        raise UserError("set train.steps or train.epochs")
    if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
        raise UserError("train.steps must be >= 1 and train.epochs > 0 (got {}, {})".format(cfg.steps, cfg.epochs))
    for key, value in (("log_every", cfg.log_every), ("keep_checkpoint_max", cfg.keep_checkpoint_max),
                       ("max_nonfinite_steps", cfg.max_nonfinite_steps)):
        if value < 1:
            raise UserError("train.{}={} must be at least 1".format(key, value))
    if cfg.checkpoint_every < 0 or (cfg.eval_every or 0) < 0:
        raise UserError("train.checkpoint_every and train.eval_every must be >= 0 (0: off)")
    check_early_stopping(cfg.early_stopping, cfg.eval_every)
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError("train.label_smoothing={} must be in [0, 1)".format(cfg.label_smoothing))
    if cfg.weight_decay < 0:
        raise UserError("train.weight_decay={} must be >= 0".format(cfg.weight_decay))
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise UserError("train.ema_decay={} must be in (0, 1), or null for no moving average".format(cfg.ema_decay))
    if cfg.clip_grad_norm is not None and cfg.clip_grad_norm <= 0:
        raise UserError("train.clip_grad_norm={} must be > 0, or null for no clipping".format(cfg.clip_grad_norm))
    for key, value in (("mixup_alpha", cfg.mixup_alpha), ("cutmix_alpha", cfg.cutmix_alpha)):
        if not 0 <= value < float("inf"):
            raise UserError("train.{}={} must be a finite number >= 0 (0: off)".format(key, value))
    if not 0 <= cfg.mix_switch_prob <= 1:
        raise UserError("train.mix_switch_prob={} must be in [0, 1]".format(cfg.mix_switch_prob))
    class_weights_setting(cfg.class_weights)
    check_progressive(cfg.progressive, cfg.steps)


def check_progressive(cfg, steps):
    """train.progressive's own ranges (the rules that involve the model and the dataset: progressive.py)."""
    if cfg.stages < 0:
        raise UserError("train.progressive.stages={} must be >= 0 (0: off)".format(cfg.stages))
    for key, value in (("min_image_size", cfg.min_image_size), ("eval_image_size", cfg.eval_image_size)):
        if value is not None and value < 32:
            raise UserError("train.progressive.{}={} is too small: EfficientNet downsamples by 32".format(key, value))
    if steps is not None and steps < cfg.stages:
        raise UserError("train.progressive.stages={} needs at least one step per stage; train.steps={}".format(
            cfg.stages, steps))
    for key, value in (("min_randaugment_magnitude", cfg.min_randaugment_magnitude),
                       ("min_mixup_alpha", cfg.min_mixup_alpha), ("min_dropout", cfg.min_dropout)):
        if not 0 <= value < float("inf"):
            raise UserError("train.progressive.{}={} must be a finite number >= 0".format(key, value))


def class_weights_setting(value):
    """train.class_weights as None (none), BALANCED, or a list of floats; UserError naming the key and value."""
    if value is None or value == "none":
        return None
    if value == BALANCED:
        return BALANCED
    if isinstance(value, (list, tuple)) and all(_is_weight(w) for w in value) and any(w > 0 for w in value):
        return [float(w) for w in value]
    raise UserError("train.class_weights={} must be none, balanced or a list [w0, w1, ...] of one weight per class, "
                    "each >= 0 and at least one above 0".format(value))


def _is_weight(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


def check_early_stopping(cfg, eval_every):
    if (cfg.patience or 0) < 0:
        raise UserError("train.early_stopping.patience={} must be >= 0 (null or 0: off)".format(cfg.patience))
    if cfg.min_delta < 0:
        raise UserError("train.early_stopping.min_delta={} must be >= 0".format(cfg.min_delta))
    if cfg.patience and not eval_every:
        raise UserError("train.early_stopping.patience={} needs train.eval_every=N (it counts those "
                        "evaluations); train.eval_every={}".format(cfg.patience, eval_every))


def check_eval(cfg):
    if cfg.batch_size < 1:
        raise UserError("eval.batch_size={} must be at least 1".format(cfg.batch_size))
    if cfg.mistakes < 0:
        raise UserError("eval.mistakes={} must be >= 0 (0: no mistakes.png)".format(cfg.mistakes))
