"""EfficientNet image preprocessing in TensorFlow graph mode (TF 1.15 and TF 2.x).

Training follows the reference EfficientNet recipe: a random distorted crop sampled on the
image's shape, decoding only that window, a centre-crop fallback when sampling failed, a
bicubic resize and an optional horizontal flip. Evaluation decodes a padded centre crop and
resizes it bicubically. Both return float32 [S, S, 3] on the 0-255 scale; `normalize` applies
the mean/std (or unit) scaling afterwards.

Input bytes may be JPEG or PNG; the format is detected in the graph from the leading bytes
(not from a file name). JPEG (RGB, greyscale or CMYK) goes through `decode_and_crop_jpeg`, so only
the crop window is decoded, exactly as in the reference. PNG (any bit depth, palette, alpha
dropped) is decoded once and the window sliced from it. Anything else stops with
"image data is neither JPEG nor PNG ...". `image_format="jpeg"` or `"png"` skips the detection.
An image whose header declares more than folder.MAX_IMAGE_PIXELS pixels stops before it is decoded.
"""
import numpy as np
import tensorflow as tf

from effnet_exp.data import augment
from effnet_exp.data.config import AugmentPolicy, Normalization
from effnet_exp.data.folder import MAX_IMAGE_PIXELS

CROP_PADDING = 32

# Reference augmentation values (tensorflow/tpu EfficientNet preprocessing).
DEFAULT_MIN_OBJECT_COVERED = 0.1
DEFAULT_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
DEFAULT_AREA_RANGE = (0.08, 1.0)
DEFAULT_MAX_ATTEMPTS = 10

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# (mean, std) per RGB channel of each Normalization: x -> (x - mean) / std, x on the 0-255 scale.
_NORMALIZATION_CONSTANTS = {
    Normalization.imagenet: (IMAGENET_MEAN, IMAGENET_STD),
    Normalization.lite: ((127.0,) * 3, (128.0,) * 3),
    Normalization.unit: ((0.0,) * 3, (255.0,) * 3),
    Normalization.signed: ((128.0,) * 3, (128.0,) * 3),
}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNSUPPORTED_FORMAT_MESSAGE = (
    "image data is neither JPEG nor PNG (GIF, BMP, WebP, TIFF and other formats are not read: "
    "convert them to JPEG or PNG)")
_FORMATS = ("auto", "jpeg", "png")


def _check_format(image_format):
    fmt = "auto" if image_format is None else str(image_format).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in _FORMATS:
        raise ValueError("image_format {!r} is not supported (expected one of: {})".format(
            image_format, ", ".join(_FORMATS)))
    return fmt


def is_png(image_bytes):
    """Boolean scalar tensor: the bytes start with the PNG signature."""
    return tf.equal(tf.strings.substr(image_bytes, 0, len(PNG_MAGIC)), PNG_MAGIC)


TOO_MANY_PIXELS_MESSAGE = "image header declares more than {} pixels (height, width):".format(MAX_IMAGE_PIXELS)


def _within_pixel_limit(image_bytes, height, width):
    """image_bytes, to be decoded only after the header's height x width passed the pixel limit."""
    pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
    small = tf.debugging.Assert(tf.less_equal(pixels, MAX_IMAGE_PIXELS), [TOO_MANY_PIXELS_MESSAGE, height, width])
    with tf.control_dependencies([small]):
        return tf.identity(image_bytes)


class _Jpeg(object):
    """Shape from the header; windows decoded directly (decode_and_crop_jpeg)."""

    def __init__(self, image_bytes):
        # [height, width, components]: components is 1 for greyscale and 4 for CMYK JPEGs, as in
        # the reference (which only ever compares it against a decoded 3-channel window).
        self._shape = tf.image.extract_jpeg_shape(image_bytes)
        self.image_bytes = _within_pixel_limit(image_bytes, self._shape[0], self._shape[1])

    def shape(self):
        return self._shape

    def window(self, crop_window):
        return tf.image.decode_and_crop_jpeg(self.image_bytes, crop_window, channels=3)


class _Decoded(object):
    """A fully decoded uint8 [H, W, 3] image; windows are slices of it."""

    def __init__(self, image):
        self.image = image

    def shape(self):
        return tf.shape(self.image)

    def window(self, crop_window):
        offset_y, offset_x, height, width = tf.unstack(crop_window)
        return tf.slice(self.image, tf.stack([offset_y, offset_x, 0]), tf.stack([height, width, 3]))


def _png(image_bytes):
    # IHDR: width, then height, as big-endian 32-bit integers at bytes 16-23.
    width_height = tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 8), tf.int32, little_endian=False)
    image_bytes = _within_pixel_limit(image_bytes, width_height[1], width_height[0])
    return _Decoded(tf.io.decode_png(image_bytes, channels=3, dtype=tf.uint8))


def _by_format(image_bytes, image_format, build):
    """build(source) for the JPEG or PNG reading of image_bytes, chosen in the graph (or forced)."""
    fmt = _check_format(image_format)
    if fmt == "jpeg":
        return build(_Jpeg(image_bytes))
    if fmt == "png":
        return build(_png(image_bytes))
    jpeg = tf.io.is_jpeg(image_bytes)
    supported = tf.debugging.Assert(tf.logical_or(jpeg, is_png(image_bytes)),
                                    [UNSUPPORTED_FORMAT_MESSAGE])
    with tf.control_dependencies([supported]):
        jpeg = tf.identity(jpeg)
    return tf.cond(jpeg, lambda: build(_Jpeg(image_bytes)), lambda: build(_png(image_bytes)))


def _resize(image, image_size):
    # Legacy bicubic resize (no half-pixel centres), as in the reference.
    return tf.compat.v1.image.resize_bicubic([image], [image_size, image_size])[0]


def _center_crop(source, image_size, crop_padding=CROP_PADDING):
    """Reference eval path: padded centre crop, decoded directly, then bicubic resize."""
    shape = source.shape()
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
    return _resize(source.window(crop_window), image_size)


def _distorted_crop(source, min_object_covered, aspect_ratio_range, area_range, max_attempts, seed=None):
    """A random crop window: seed None or an int (op-level, with the graph seed) samples it with TF's
    stateful op; a [2] int64 tensor samples it statelessly (see `_stateless_crop_window`)."""
    shape = source.shape()
    if isinstance(seed, tf.Tensor):
        crop_window = _stateless_crop_window(shape, seed, min_object_covered, aspect_ratio_range,
                                             area_range, max_attempts)
        return source.window(crop_window)
    # Both op seeds from the graph seed: an op seed alone (seed2 left at 0) makes seed=0 mean "random".
    seed1, seed2 = tf.compat.v1.get_seed(seed)
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
    bbox_begin, bbox_size, _ = tf.compat.v1.image.sample_distorted_bounding_box(
        shape,
        bounding_boxes=bbox,
        seed=seed1,
        seed2=seed2,
        min_object_covered=float(min_object_covered),
        aspect_ratio_range=[float(v) for v in aspect_ratio_range],
        area_range=[float(v) for v in area_range],
        max_attempts=int(max_attempts),
        use_image_if_no_bounding_boxes=True)
    offset_y, offset_x, _ = tf.unstack(bbox_begin)
    target_height, target_width, _ = tf.unstack(bbox_size)
    crop_window = tf.stack([offset_y, offset_x, target_height, target_width])
    return source.window(crop_window)


def _stateless_crop_window(shape, seed, min_object_covered, aspect_ratio_range, area_range, max_attempts):
    """[y, x, h, w] drawn like sample_distorted_bounding_box with the whole image as the box (aspect
    ratio uniform, then height uniform between the heights that give the area range, then the offset),
    but from a stateless seed, so that an element's crop does not depend on which thread of a parallel
    map draws it. All attempts are drawn at once; the first that fits wins, else the whole image."""
    attempts = int(max_attempts)
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    draws = tf.random.stateless_uniform([attempts, 4], seed=seed, dtype=tf.float32)
    low, high = [float(v) for v in aspect_ratio_range]
    aspect = low + (high - low) * draws[:, 0]
    image_area = height * width
    min_area = float(area_range[0]) * image_area
    max_area = float(area_range[1]) * image_area
    min_h = tf.round(tf.sqrt(min_area / aspect))
    max_h = tf.round(tf.sqrt(max_area / aspect))
    max_h = tf.where(tf.round(max_h * aspect) > width, tf.floor((width + 0.5 - 1e-7) / aspect), max_h)
    max_h = tf.minimum(max_h, height)
    min_h = tf.minimum(min_h, max_h)
    crop_h = min_h + tf.floor(draws[:, 1] * (max_h - min_h + 1.0))
    crop_h = tf.minimum(crop_h, max_h)
    crop_w = tf.round(crop_h * aspect)
    area = crop_h * crop_w
    fits = tf.reduce_all(tf.stack([
        area >= min_area, area <= max_area, area >= float(min_object_covered) * image_area,
        crop_h >= 1.0, crop_w >= 1.0, crop_h <= height, crop_w <= width]), axis=0)
    offset_y = tf.floor(draws[:, 2] * (height - crop_h + 1.0))
    offset_x = tf.floor(draws[:, 3] * (width - crop_w + 1.0))
    windows = tf.cast(tf.stack([offset_y, offset_x, crop_h, crop_w], axis=1), tf.int32)
    whole = tf.stack([0, 0, tf.cast(shape[0], tf.int32), tf.cast(shape[1], tf.int32)])
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    return tf.cond(tf.reduce_any(fits), lambda: windows[first], lambda: whole)


def _at_least_x_are_equal(a, b, x):
    match = tf.cast(tf.equal(a, b), tf.int32)
    return tf.greater_equal(tf.reduce_sum(match), x)


def _random_flip(image, seed=None):
    if isinstance(seed, tf.Tensor):
        uniform = tf.random.stateless_uniform([], seed=seed + tf.constant([1, 0], seed.dtype))
    else:
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
                         image_format="auto",
                         policy=AugmentPolicy.none,
                         num_layers=2,
                         magnitude=10.0):
    """Random-crop training preprocessing of JPEG or PNG bytes -> float32 [S, S, 3], 0-255 scale.

    `seed`: None or an int op-level seed (with the graph-level seed, crops and flips repeat only
    if the elements draw in the same order, i.e. in a sequential map), or a [2] int64 tensor, a
    stateless seed of this one element (the input pipeline's choice: the same crop and flip for
    the same element, whatever thread of a parallel map runs it).

    `policy` (an AugmentPolicy or its name) other than none: the reference's place for it, after the
    resize and flip, on the image clipped and cast to uint8 (num_layers and magnitude: RandAugment's).
    """
    image_size = int(image_size)

    def build(source):
        image = _distorted_crop(source, min_object_covered, aspect_ratio_range, area_range,
                                max_attempts, seed=seed)
        # Sampling failed when the window is the whole image (reference check: >= 3 dims equal).
        bad = _at_least_x_are_equal(source.shape(), tf.shape(image), 3)
        return tf.cond(bad,
                       lambda: _center_crop(source, image_size, crop_padding),
                       lambda: _resize(image, image_size))

    image = _by_format(image_bytes, image_format, build)
    if random_flip:
        flip_seed = seed if seed is None or isinstance(seed, tf.Tensor) else int(seed) + 1
        image = _random_flip(image, seed=flip_seed)
    image = tf.reshape(image, [image_size, image_size, 3])
    if AugmentPolicy(policy) != AugmentPolicy.none:
        pixels = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
        image = augment.augment(pixels, AugmentPolicy(policy).value, _policy_seed(seed),
                                num_layers=num_layers, magnitude=magnitude)
    return tf.cast(image, tf.float32)


def _policy_seed(seed):
    """The stateless [2] seed the policy draws from: the element's own, else one drawn (statefully) now."""
    if isinstance(seed, tf.Tensor):
        return seed
    return tf.compat.v1.random_uniform([2], maxval=2 ** 62, dtype=tf.int64,
                                       seed=None if seed is None else int(seed) + 2)


def preprocess_for_eval(image_bytes, image_size, crop_padding=CROP_PADDING, image_format="auto"):
    """Reference eval preprocessing (centre crop + bicubic) of JPEG or PNG bytes -> float32 [S, S, 3],
    0-255 scale. Other formats fail at run time with UNSUPPORTED_FORMAT_MESSAGE."""
    image_size = int(image_size)
    image = _by_format(image_bytes, image_format,
                       lambda source: _center_crop(source, image_size, crop_padding))
    image = tf.reshape(image, [image_size, image_size, 3])
    return tf.cast(image, tf.float32)


def preprocess_image(image_bytes, image_size, is_training, cfg, seed=None, image_format="auto"):
    """Dispatch on is_training, with the augmentation settings and crop padding of the DatasetConfig cfg."""
    if is_training:
        return preprocess_for_train(
            image_bytes, image_size,
            min_object_covered=cfg.min_object_covered,
            aspect_ratio_range=tuple(cfg.aspect_ratio_range),
            area_range=tuple(cfg.area_range),
            max_attempts=cfg.max_attempts,
            random_flip=bool(cfg.random_flip),
            crop_padding=cfg.crop_padding,
            seed=seed,
            image_format=image_format,
            policy=cfg.augment,
            num_layers=cfg.randaugment.num_layers,
            magnitude=cfg.randaugment.magnitude)
    return preprocess_for_eval(image_bytes, image_size, crop_padding=cfg.crop_padding, image_format=image_format)


def normalization_constants(mode):
    """(mean, std), three floats each: what `normalize(images, mode)` computes is (x - mean) / std per RGB
    channel, x on the 0-255 scale. mode: a Normalization (or its value); ValueError names a bad one."""
    return _NORMALIZATION_CONSTANTS[Normalization(mode)]


def pixels(images, mode):
    """uint8 images (NumPy) of normalised float images: the inverse of `normalize(images, mode)`, rounded and
    clipped to 0-255 (what the model saw, for a person to look at)."""
    mean, std = normalization_constants(mode)
    restored = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.round(restored), 0, 255).astype(np.uint8)


def normalize(images, mode, rows=True):
    """Scale float images on the 0-255 scale by the Normalization mode (or its value): imagenet (mean/std
    per channel), unit (/255), lite ((x - 127) / 128, what the EfficientNet-Lite weights expect) or signed
    ((x - 128) / 128, EfficientNetV2-S/M/L).
    ValueError for anything else.

    rows=False: imagenet as plain broadcast Sub and RealDiv ops, what graph converters (Ascend's ATC,
    TFLite) expect in an exported model; the same values, slower on TensorFlow's CPU kernels."""
    mode = Normalization(mode)
    images = tf.cast(images, tf.float32)
    if mode == Normalization.imagenet:
        channels_last = images.shape.ndims is not None and images.shape.ndims >= 2 and images.shape[-1] == 3
        if rows and channels_last:
            return _per_channel(images, IMAGENET_MEAN, IMAGENET_STD)
        return (images - tf.constant(IMAGENET_MEAN, tf.float32)) / tf.constant(IMAGENET_STD, tf.float32)
    if mode == Normalization.lite:
        return (images - 127.0) / 128.0
    if mode == Normalization.signed:
        return (images - 128.0) / 128.0
    return images / 255.0


def _per_channel(images, mean, std):
    """(images - mean) / std with per-channel mean and std, images [..., W, C] with a known rank and C.

    The same values as broadcasting the [3] vectors, computed on rows of W * 3 values against the
    vectors tiled W times: Eigen does not vectorise a broadcast whose inner dimension is 3, which
    made this the most expensive op of the eval preprocessing after decoding (about 0.3 ms of 1.7 ms
    per 224x224 image)."""
    channels = len(mean)
    width = images.shape[-2]
    width = width if isinstance(width, int) else getattr(width, "value", None)  # TF 1.15: a Dimension
    if width is not None:
        mean_row = tf.constant(np.tile(np.asarray(mean, np.float32), width))
        std_row = tf.constant(np.tile(np.asarray(std, np.float32), width))
        row_shape = [-1, width * channels]
    else:
        width = tf.shape(images)[-2]
        mean_row = tf.tile(tf.constant(mean, tf.float32), [width])
        std_row = tf.tile(tf.constant(std, tf.float32), [width])
        row_shape = tf.stack([-1, width * channels])
    rows = tf.reshape(images, row_shape)
    out = tf.reshape((rows - mean_row) / std_row, tf.shape(images))
    out.set_shape(images.shape)
    return out
