"""EfficientNet image preprocessing in TensorFlow graph mode (TF 1.15 and TF 2.x).

Training follows the reference EfficientNet recipe: a random distorted crop sampled on the
JPEG's shape, decoding only that window, a centre-crop fallback when sampling failed, a
bicubic resize and an optional horizontal flip. Evaluation decodes a padded centre crop and
resizes it bicubically. Both return float32 [S, S, 3] on the 0-255 scale; `normalize` applies
the mean/std (or unit) scaling afterwards.

Only JPEG input is handled today. The decoding is funnelled through `_image_shape` and
`_decode_window`, which take an `image_format` argument, so another format (e.g. PNG: decode
fully, then crop) can be added there without touching the crop logic.
"""
import tensorflow as tf

CROP_PADDING = 32

# Reference augmentation values (tensorflow/tpu EfficientNet preprocessing).
DEFAULT_MIN_OBJECT_COVERED = 0.1
DEFAULT_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_AREA_RANGE = (0.08, 1.0)
DEFAULT_MAX_ATTEMPTS = 10

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
NORMALIZATION_MODES = ("imagenet", "unit")

_SUPPORTED_FORMATS = ("jpeg",)


def _check_format(image_format):
    fmt = str(image_format).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in _SUPPORTED_FORMATS:
        raise NotImplementedError(
            "image_format {!r} is not supported yet (supported: {})".format(
                image_format, ", ".join(_SUPPORTED_FORMATS)))
    return fmt


def _image_shape(image_bytes, image_format="jpeg"):
    """int32 [height, width, channels] of the encoded image, without decoding it."""
    _check_format(image_format)
    return tf.image.extract_jpeg_shape(image_bytes)


def _decode_window(image_bytes, crop_window, image_format="jpeg"):
    """Decode only crop_window = [offset_h, offset_w, h, w] of the image, as uint8 RGB."""
    _check_format(image_format)
    return tf.image.decode_and_crop_jpeg(image_bytes, crop_window, channels=3)


def _resize(image, image_size):
    # Legacy bicubic resize (no half-pixel centres), as in the reference.
    return tf.compat.v1.image.resize_bicubic([image], [image_size, image_size])[0]


def _decode_and_center_crop(image_bytes, image_size, crop_padding=CROP_PADDING, image_format="jpeg"):
    """Reference eval path: padded centre crop, decoded directly, then bicubic resize."""
    shape = _image_shape(image_bytes, image_format)
    image_height = shape[0]
    image_width = shape[1]
    # Python float ratio times a float32 tensor, then truncation to int32: same as the reference.
    padded_center_crop_size = tf.cast(
        ((image_size / (image_size + crop_padding)) *
         tf.cast(tf.minimum(image_height, image_width), tf.float32)),
        tf.int32)
    offset_height = ((image_height - padded_center_crop_size) + 1) // 2
    offset_width = ((image_width - padded_center_crop_size) + 1) // 2
    crop_window = tf.stack([offset_height, offset_width,
                            padded_center_crop_size, padded_center_crop_size])
    image = _decode_window(image_bytes, crop_window, image_format)
    return _resize(image, image_size)


def _distorted_bounding_box_crop(image_bytes, min_object_covered, aspect_ratio_range, area_range,
                                 max_attempts, seed=None, image_format="jpeg"):
    shape = _image_shape(image_bytes, image_format)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    bbox_begin, bbox_size, _ = tf.compat.v1.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=bbox,
        seed=seed,
        min_object_covered=float(min_object_covered),
        aspect_ratio_range=[float(v) for v in aspect_ratio_range],
        area_range=[float(v) for v in area_range],
        max_attempts=int(max_attempts),
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(bbox_begin)
    target_height, target_width, _ = tf.unstack(bbox_size)
    crop_window = tf.stack([offset_y, offset_x, target_height, target_width])
    return _decode_window(image_bytes, crop_window, image_format)


def _at_least_x_are_equal(a, b, x):
    match = tf.cast(tf.equal(a, b), tf.int32)
    return tf.greater_equal(tf.reduce_sum(match), x)


def _random_flip(image, seed=None):
    uniform = tf.compat.v1.random_uniform([], 0.0, 1.0, seed=seed)
    return tf.cond(tf.less(uniform, 0.5),
                   lambda: tf.reverse(image, axis=[1]),
                   lambda: image)


def preprocess_for_train(image_bytes, image_size,
                         min_object_covered=DEFAULT_MIN_OBJECT_COVERED,
                         aspect_ratio_range=DEFAULT_ASPECT_RATIO_RANGE,
                         area_range=DEFAULT_AREA_RANGE,
                         max_attempts=DEFAULT_MAX_ATTEMPTS,
                         random_flip=True,
                         crop_padding=CROP_PADDING,
                         seed=None,
                         image_format="jpeg"):
    """Random-crop training preprocessing -> float32 [S, S, 3], 0-255 scale (not normalised).

    `seed` is an op-level seed (an int or None); combined with a graph-level seed it makes the
    sampled crops and flips reproducible. The flip uses seed + 1 so the two draws differ.
    Note that with a parallel map the order in which elements consume the random stream is not
    fixed, so per-element augmentation is only reproducible with num_parallel_calls=1.
    """
    image_size = int(image_size)
    image = _distorted_bounding_box_crop(
        image_bytes, min_object_covered, aspect_ratio_range, area_range, max_attempts,
        seed=seed, image_format=image_format)
    original_shape = _image_shape(image_bytes, image_format)
    # Sampling failed when the window is the whole image (reference check: >= 3 dims equal).
    bad = _at_least_x_are_equal(original_shape, tf.shape(image), 3)
    image = tf.cond(
        bad,
        lambda: _decode_and_center_crop(image_bytes, image_size, crop_padding, image_format),
        lambda: _resize(image, image_size))
    if random_flip:
        image = _random_flip(image, seed=None if seed is None else int(seed) + 1)
    image = tf.reshape(image, [image_size, image_size, 3])
    return tf.cast(image, tf.float32)


def preprocess_for_eval(image_bytes, image_size, crop_padding=CROP_PADDING, image_format="jpeg"):
    """Reference eval preprocessing (centre crop + bicubic) -> float32 [S, S, 3], 0-255 scale."""
    image_size = int(image_size)
    image = _decode_and_center_crop(image_bytes, image_size, crop_padding, image_format)
    image = tf.reshape(image, [image_size, image_size, 3])
    return tf.cast(image, tf.float32)


def preprocess_image(image_bytes, image_size, is_training, cfg=None, seed=None, image_format="jpeg"):
    """Dispatch on is_training, taking augmentation settings from a DatasetConfig (or defaults)."""
    crop_padding = getattr(cfg, "crop_padding", CROP_PADDING)
    if is_training:
        return preprocess_for_train(
            image_bytes, image_size,
            min_object_covered=getattr(cfg, "min_object_covered", DEFAULT_MIN_OBJECT_COVERED),
            aspect_ratio_range=tuple(getattr(cfg, "aspect_ratio_range", DEFAULT_ASPECT_RATIO_RANGE)),
            area_range=tuple(getattr(cfg, "area_range", DEFAULT_AREA_RANGE)),
            max_attempts=getattr(cfg, "max_attempts", DEFAULT_MAX_ATTEMPTS),
            random_flip=bool(getattr(cfg, "random_flip", True)),
            crop_padding=crop_padding,
            seed=seed,
            image_format=image_format)
    return preprocess_for_eval(image_bytes, image_size, crop_padding=crop_padding,
                               image_format=image_format)


def check_normalization(mode):
    """Return the canonical normalization name, or raise ValueError naming the bad value."""
    key = mode.lower() if isinstance(mode, str) else mode
    if key not in NORMALIZATION_MODES:
        raise ValueError("unknown normalization {!r}; expected one of: {}".format(
            mode, ", ".join(NORMALIZATION_MODES)))
    return key


def normalize(images, mode):
    """Scale float images on the 0-255 scale: "imagenet" (mean/std per channel) or "unit" (/255)."""
    key = check_normalization(mode)
    if key == "imagenet":
        images = tf.cast(images, tf.float32)
        mean = tf.constant(IMAGENET_MEAN, dtype=tf.float32)
        std = tf.constant(IMAGENET_STD, dtype=tf.float32)
        return (images - mean) / std
    # "unit"
    return tf.cast(images, tf.float32) / 255.0
