"""Typed schema of the `dataset` config group (no TensorFlow import here)."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DatasetConfig:
    name: str = "tfrecord"
    # Folder holding the TFRecord shards. Relative paths resolve against the directory run.py was started from.
    data_dir: Optional[str] = None
    train_pattern: str = "train-*"
    eval_pattern: str = "validation-*"
    num_classes: int = 1000
    # Subtracted from the stored label (ImageNet TFRecords store 1..1000).
    label_offset: int = 0
    image_key: str = "image/encoded"
    label_key: str = "image/class/label"
    # imagenet: (x - mean) / std on the 0-255 scale; unit: x / 255.
    normalization: str = "imagenet"
    # Suggested input size for this dataset; model.image_size wins when set.
    image_size: Optional[int] = None
    # Record counts; None means count the records once.
    num_train_images: Optional[int] = None
    num_eval_images: Optional[int] = None
    # A dataset that ships with an installed package ("digits"), converted once into cache_dir.
    builtin: Optional[str] = None
    cache_dir: str = "${oc.env:EFFNET_EXP_CACHE,'~/.cache/effnet_exp'}"
    # Training augmentation (reference values).
    random_flip: bool = True
    min_object_covered: float = 0.1
    aspect_ratio_range: List[float] = field(default_factory=lambda: [0.75, 1.33])
    area_range: List[float] = field(default_factory=lambda: [0.08, 1.0])
    max_attempts: int = 10
    crop_padding: int = 32
    # tf.data knobs; -1 means AUTOTUNE.
    shuffle_buffer: int = 1024
    cycle_length: int = 8
    num_parallel_calls: int = -1
    prefetch: int = -1
