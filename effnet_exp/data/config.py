"""Typed schema of the `dataset` config group and its per-field checks (no TensorFlow import here)."""
import enum
from dataclasses import dataclass, field
from typing import List, Optional

from effnet_exp.errors import UserError


# The files beside a dataset's TFRecord shards: class names one per line, and what the conversion wrote.
LABELS_FILE = "labels.txt"
MANIFEST = "manifest.json"
# Beyond it, several ops stop changing (Solarize) or wrap around (Rotate past 90 degrees at 30).
MAX_MAGNITUDE = 30.0


class Normalization(str, enum.Enum):
    """How 0-255 pixels become the model's input (effnet_exp/data/preprocessing.py:normalize)."""
    imagenet = "imagenet"  # (x - ImageNet mean) / ImageNet std, per channel, on the 0-255 scale
    unit = "unit"  # x / 255
    lite = "lite"  # (x - 127) / 128, what the EfficientNet-Lite weights expect
    signed = "signed"  # (x - 128) / 128, what EfficientNetV2-S/M/L expect (the authors' and Keras's preprocessing)


class AugmentPolicy(str, enum.Enum):
    """The training images' augmentation policy (effnet_exp/data/augment.py), the reference's names."""
    none = "none"
    autoaugment = "autoaugment"  # policy v0: one of 25 two-op sub-policies per image
    randaugment = "randaugment"  # num_layers ops drawn per image, each at the same magnitude


@dataclass
class RandAugmentConfig:
    # The reference's defaults (its flags randaug_num_layers and randaug_magnitude).
    num_layers: int = 2
    # On the reference's scale: 10 is its maximum level; above 10 the ops go further (rotate 45 degrees at 15).
    magnitude: float = 10.0


class Builtin(str, enum.Enum):
    """Datasets that ship with an installed package (effnet_exp/data/bundled.py)."""
    digits = "digits"  # scikit-learn's 8x8 handwritten digits


@dataclass
class DatasetConfig:
    name: str = "tfrecord"
    # Folder holding the TFRecord shards. Relative paths resolve against the directory run.py was started from.
    data_dir: Optional[str] = None
    # dataset=image_folder: a folder with one sub-folder of JPEG/PNG images per class (class index = sorted
    # folder names), or train/ and val/ trees of such folders. Wins over data_dir when set.
    root: Optional[str] = None
    # image_folder without a val/ tree: this fraction of each class (stratified, at least one image per
    # class of two or more) is held out for evaluation, chosen by split_seed. 0: no validation split.
    val_fraction: float = 0.2
    split_seed: int = 0
    train_pattern: str = "train-*"
    eval_pattern: str = "validation-*"
    # 0: take it from the data (image_folder: the number of class folders; TFRecords: their manifest.json).
    num_classes: int = 1000
    # Subtracted from the stored label (ImageNet TFRecords store 1..1000).
    label_offset: int = 0
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    # imagenet: (x - mean) / std on the 0-255 scale; unit: x / 255.
    normalization: Normalization = Normalization.imagenet
    # Suggested input size for this dataset; model.image_size wins when set.
    image_size: Optional[int] = None
    # Record counts; None means count the records once.
    num_train_images: Optional[int] = None
    num_eval_images: Optional[int] = None
    # A dataset that ships with an installed package ("digits"), converted once into cache_dir.
    builtin: Optional[Builtin] = None
    cache_dir: str = "${oc.env:EFFNET_EXP_CACHE,'~/.cache/effnet_exp'}"
    # Training augmentation (reference values).
    random_flip: bool = True
    min_object_covered: float = 0.1
    aspect_ratio_range: List[float] = field(default_factory=lambda: [0.75, 1.33])
    area_range: List[float] = field(default_factory=lambda: [0.08, 1.0])
    max_attempts: int = 10
    crop_padding: int = 32
    # A policy applied to each training image after crop, flip and resize, on its uint8 pixels (evaluation is never
    # augmented). Its pixel constants (translate, cutout) are the reference's at 224x224, scaled with the image size.
    augment: AugmentPolicy = AugmentPolicy.none
    randaugment: RandAugmentConfig = field(default_factory=RandAugmentConfig)
    # tf.data knobs; -1 means AUTOTUNE.
    # Records held for shuffling (serialized, before decoding): bounds the pipeline's memory.
    shuffle_buffer: int = 1024
    # Shards (TFRecord files) read in parallel, and the read buffer of each. Large buffers help remote
    # storage (the reference used 8 MB on GCS) but fragment the heap of a long run on local disks.
    cycle_length: int = 8
    read_buffer_mb: float = 0.25
    num_parallel_calls: int = -1
    prefetch: int = -1
    # Threads of the pipeline's own pool (0: TensorFlow's shared inter-op pool) and per-op threads.
    private_threadpool_size: int = 0
    max_intra_op_parallelism: int = 1
    # tf.data's autotuning of AUTOTUNE values (always off on TF 1.15: its autotuner can crash at teardown).
    autotune: bool = True
    # Keep decoded evaluation images in memory after the first pass (memory grows with the eval set).
    cache_eval: bool = False
    # Bad data (truncated or corrupt TFRecord files, records without the image key, images that cannot
    # be decoded): false stops the run with an error naming the file and record; true skips and counts
    # them (logged, and "skipped_records" in eval.json). Labels outside [0, num_classes) always stop it.
    skip_bad_records: bool = False
    # TFRecord datasets up to this many MB are read once before training to check every record's framing,
    # Example, image key and label (larger ones are checked as they are read). 0: never.
    precheck_max_mb: int = 1024


def check_dataset(cfg):
    """Per-field ranges of the dataset section; raises UserError naming the key and its value."""
    _require(0.0 <= cfg.val_fraction < 1.0, "val_fraction", cfg.val_fraction, "in [0, 1)")
    _require(cfg.num_classes >= 0, "num_classes", cfg.num_classes, "0 (from the data) or more")
    _require(cfg.image_size is None or cfg.image_size >= 1, "image_size", cfg.image_size, "at least 1")
    _require(0.0 <= cfg.min_object_covered <= 1.0, "min_object_covered", cfg.min_object_covered, "in [0, 1]")
    _require(_is_range(cfg.aspect_ratio_range, float("inf")), "aspect_ratio_range", cfg.aspect_ratio_range,
             "[low, high] with 0 < low <= high")
    _require(_is_range(cfg.area_range, 1.0), "area_range", cfg.area_range, "[low, high] with 0 < low <= high <= 1")
    _require(cfg.max_attempts >= 1, "max_attempts", cfg.max_attempts, "at least 1")
    _require(cfg.crop_padding >= 0, "crop_padding", cfg.crop_padding, "0 or more")
    _require(0 <= cfg.randaugment.num_layers <= 16, "randaugment.num_layers", cfg.randaugment.num_layers,
             "in [0, 16]")
    _require(0.0 <= cfg.randaugment.magnitude <= MAX_MAGNITUDE, "randaugment.magnitude", cfg.randaugment.magnitude,
             "in [0, {}] (10 is the reference's maximum level)".format(MAX_MAGNITUDE))
    # 0 or 1: no shuffle.
    _require(cfg.shuffle_buffer >= 0, "shuffle_buffer", cfg.shuffle_buffer, "0 or more")
    _require(cfg.cycle_length >= 1, "cycle_length", cfg.cycle_length, "at least 1")
    _require(cfg.read_buffer_mb > 0, "read_buffer_mb", cfg.read_buffer_mb, "above 0")
    _require(cfg.num_parallel_calls == -1 or cfg.num_parallel_calls >= 1, "num_parallel_calls",
             cfg.num_parallel_calls, "-1 (AUTOTUNE) or at least 1")
    _require(cfg.prefetch >= -1, "prefetch", cfg.prefetch, "-1 (AUTOTUNE), 0 (none) or more")
    _require(cfg.private_threadpool_size >= 0, "private_threadpool_size", cfg.private_threadpool_size,
             "0 (the shared pool) or more")
    _require(cfg.max_intra_op_parallelism >= 0, "max_intra_op_parallelism", cfg.max_intra_op_parallelism,
             "0 (unset) or more")
    _require(cfg.precheck_max_mb >= 0, "precheck_max_mb", cfg.precheck_max_mb, "0 (never) or more")


def _is_range(pair, upper):
    return len(pair) == 2 and 0.0 < pair[0] <= pair[1] <= upper


def _require(ok, key, value, what):
    if not ok:
        raise UserError("dataset.{}={} must be {}".format(key, value, what))
