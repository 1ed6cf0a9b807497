"""Progressive learning (train.progressive; the EfficientNetV2 paper's Algorithm 1): which steps each stage trains,
at which image size and with how much regularisation, decided here once. No TensorFlow: the trainer builds one graph
per stage from stage_spec(), the evaluator reads eval_spec()."""
import dataclasses
import math
from collections import namedtuple

from effnet_exp.data.config import AugmentPolicy
from effnet_exp.errors import UserError
from effnet_exp.modes import TRAINING_MODES

# The sizes between the first and the last stage are rounded to a multiple of 8: a side divisible by 8 halves
# exactly through the first three stride-2 convolutions (the authors' main.py rounds its train size to 16 for the
# same reason), while 8 stays fine enough for small ranges such as 32 -> 48.
SIZE_MULTIPLE = 8
# Below this EfficientNet's five stride-2 layers leave less than one pixel.
MIN_SIZE = 32


class Stage(namedtuple("Stage", "index count first_step last_step image_size magnitude mixup_alpha dropout")):
    """Stage `index` (1-based) of `count` trains the global steps first_step + 1 ... last_step. magnitude is None
    when the run does not use RandAugment."""
    __slots__ = ()

    def describe(self):
        parts = ["{0}x{0}".format(self.image_size)]
        if self.magnitude is not None:
            parts.append("RandAugment magnitude {:g}".format(self.magnitude))
        parts += ["MixUp alpha {:g}".format(self.mixup_alpha), "dropout {:g}".format(self.dropout)]
        return "progressive learning, stage {}/{}: steps {}-{} at {}".format(
            self.index, self.count, self.first_step + 1, self.last_step, ", ".join(parts))

    def record(self):
        """The stage's metrics.jsonl record, at the step it starts from."""
        return {"step": self.first_step, "stage": self.index, "stages": self.count, "last_step": self.last_step,
                "image_size": self.image_size, "randaugment_magnitude": self.magnitude,
                "mixup_alpha": self.mixup_alpha, "dropout": self.dropout}


class Plan(namedtuple("Plan", "count total_steps steps_per_run image_size magnitude mixup_alpha dropout")):
    """What stages() needs: the stage count, the run's steps (a multiple of steps_per_run, the device loop) and
    (min, max) of each growing setting (magnitude None without RandAugment)."""
    __slots__ = ()


def plan(cfg, image_size, total_steps, steps_per_run):
    """The Plan of a run config whose training ends at image_size; None when progressive learning is off."""
    progressive = cfg.train.progressive
    if not progressive.stages:
        return None
    magnitude = (progressive.min_randaugment_magnitude, cfg.dataset.randaugment.magnitude) \
        if cfg.dataset.augment == AugmentPolicy.randaugment else None
    image_size = final_train_size(cfg, image_size)
    return Plan(count=progressive.stages, total_steps=total_steps, steps_per_run=steps_per_run,
                image_size=(min_image_size(progressive, image_size), image_size), magnitude=magnitude,
                mixup_alpha=(progressive.min_mixup_alpha, cfg.train.mixup_alpha),
                dropout=(progressive.min_dropout, cfg.model.dropout_rate))


def final_train_size(cfg, image_size):
    """The last stage's size: the run's image size, except for a variant with its own train size
    (model.train_resolution: EfficientNetV2 trains smaller than it evaluates) when no size was asked for."""
    if cfg.model.image_size or cfg.dataset.image_size or not cfg.model.train_resolution:
        return image_size
    return cfg.model.train_resolution


def min_image_size(progressive, image_size):
    """The first stage's size: train.progressive.min_image_size, else half image_size (a multiple of 8, >= 32)."""
    if progressive.min_image_size:
        return progressive.min_image_size
    return max(MIN_SIZE, int(image_size) // (2 * SIZE_MULTIPLE) * SIZE_MULTIPLE)


def stages(spec):
    """[Stage] of a Plan: equal shares of the steps (in whole device loops; the last stage takes the remainder),
    every setting linear in the stage index from its min (first stage) to its max (last stage)."""
    count = spec.count
    loops = spec.total_steps // spec.steps_per_run
    if loops < count:
        raise UserError("train.progressive.stages={} needs at least one step per stage (one device loop of {} "
                        "steps); the run has {} steps".format(count, spec.steps_per_run, spec.total_steps))
    bounds = [spec.steps_per_run * (loops * k // count) for k in range(count)] + [spec.total_steps]
    sizes = _sizes(spec.image_size, count)
    return [Stage(index=i + 1, count=count, first_step=bounds[i], last_step=bounds[i + 1], image_size=sizes[i],
                  magnitude=_linear(spec.magnitude, i, count) if spec.magnitude else None,
                  mixup_alpha=_linear(spec.mixup_alpha, i, count), dropout=_linear(spec.dropout, i, count))
            for i in range(count)]


def _linear(bounds, index, count):
    low, high = bounds
    if count == 1:
        return float(high)
    return float(low + (high - low) * index / float(count - 1))


def _sizes(bounds, count):
    """The first stage at the min size, the last at the max, those between rounded to SIZE_MULTIPLE."""
    low, high = bounds
    if count == 1:
        return [int(high)]
    between = [int(math.floor(_linear(bounds, i, count) / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE
               for i in range(1, count - 1)]
    return [int(low)] + [min(max(size, low), high) for size in between] + [int(high)]


def stage_at(stage_list, step):
    """The stage that trains the step after `step` (the last stage once the run is complete)."""
    for stage in stage_list:
        if step < stage.last_step:
            return stage
    return stage_list[-1]


def stage_spec(spec, stage, resume_checkpoint, resume_step):
    """The RunSpec one stage trains: its image size, magnitude, MixUp alpha and dropout, resumed from the
    checkpoint the stage starts from (the step totals, and so the learning-rate schedule, stay the run's)."""
    cfg = spec.cfg
    dataset = cfg.dataset
    if stage.magnitude is not None:
        dataset = dataclasses.replace(dataset, randaugment=dataclasses.replace(dataset.randaugment,
                                                                               magnitude=stage.magnitude))
    model = dataclasses.replace(spec.model, dropout_rate=stage.dropout)
    cfg = dataclasses.replace(cfg, dataset=dataset, model=dataclasses.replace(cfg.model, dropout_rate=stage.dropout),
                              train=dataclasses.replace(cfg.train, mixup_alpha=stage.mixup_alpha))
    return dataclasses.replace(spec, cfg=cfg, model=model, image_size=stage.image_size,
                               resume_checkpoint=resume_checkpoint, resume_step=resume_step)


def eval_image_size(cfg, image_size):
    """The evaluation's image size: train.progressive.eval_image_size, else the run's (image_size: for a V2 variant
    without a size asked for, model.resolution, its eval size)."""
    return cfg.train.progressive.eval_image_size or image_size


def eval_spec(spec):
    """The RunSpec the evaluator reads: the run's, at the evaluation's image size."""
    size = eval_image_size(spec.cfg, spec.image_size)
    return spec if size == spec.image_size else dataclasses.replace(spec, image_size=size)


def check_run(cfg, image_size):
    """The rules of train.progressive that involve other sections (image_size: the size the run asks for);
    UserError naming the keys and values."""
    progressive = cfg.train.progressive
    if not progressive.stages or cfg.mode not in TRAINING_MODES:
        return
    size = final_train_size(cfg, image_size)
    if (progressive.min_image_size or 0) > size:
        raise UserError("train.progressive.min_image_size={} is larger than the run's last train size {} "
                        "(model.image_size, else dataset.image_size, else model.train_resolution, else "
                        "model.resolution)".format(progressive.min_image_size, size))
    pairs = [("train.progressive.min_mixup_alpha", progressive.min_mixup_alpha, "train.mixup_alpha",
              cfg.train.mixup_alpha),
             ("train.progressive.min_dropout", progressive.min_dropout, "model.dropout_rate", cfg.model.dropout_rate)]
    if cfg.dataset.augment == AugmentPolicy.randaugment:
        pairs.insert(0, ("train.progressive.min_randaugment_magnitude", progressive.min_randaugment_magnitude,
                         "dataset.randaugment.magnitude", cfg.dataset.randaugment.magnitude))
    for low_key, low, high_key, high in pairs:
        if low > high:
            raise UserError("{}={} is above {}={}: regularisation grows from the min to that value".format(
                low_key, low, high_key, high))
