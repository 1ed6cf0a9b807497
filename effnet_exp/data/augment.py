"""AutoAugment (policy v0) and RandAugment on uint8 [H, W, 3] images, in TensorFlow graph mode (TF 1.15 and
TF 2.x), usable inside a tf.data map function.

The ops and their level -> argument mapping are those of the reference tensorflow/tpu `autoaugment.py`
(max level 10): Rotate level/10*30 degrees, ShearX/Y level/10*0.3, TranslateX/Y level/10*translate_const
pixels (each of these with a sign), Posterize int(level/10*4) bits kept, Solarize threshold int(level/10*256),
SolarizeAdd int(level/10*110) added below 128, Cutout half-size int(level/10*cutout_const), and Color,
Contrast, Brightness, Sharpness blended with the factor level/10*1.8 + 0.1. `constants` picks the pixel
constants: "autoaugment" (cutout 100, translate 250) or "randaugment" (cutout 40, translate 100).

Every op but SolarizeAdd and Cutout (the reference's own) is PIL's, the library the policies were
designed with, pixel for pixel:
- Invert, Posterize, Solarize, AutoContrast, Equalize are PIL.ImageOps' functions (per channel).
  Posterize keeps at least 1 bit: at levels below 2.5 (0 bits) TF clamps the reference's shift by 8 to a
  shift by 7, and current Pillow refuses 0 bits (older Pillow turns the image black).
- Color, Contrast, Brightness, Sharpness are PIL.ImageEnhance's: PIL's integer greyscale, a float32 blend,
  truncated. Contrast blends against the rounded mean of the greyscale image as PIL does, not against the
  reference's "mean" (the pixel count / 256, a bug): the op should mean contrast against the image's own
  mean grey. Sharpness blurs with PIL's SMOOTH kernel, rounded, border pixels kept.
- Rotate, ShearX/Y, TranslateX/Y are PIL's `image.transform(size, Image.AFFINE, data, Image.NEAREST,
  fillcolor=(128, 128, 128))` with the data of `_affine_data`: Rotate turns counter-clockwise about the
  image centre as `image.rotate` does; ShearX is (1, s, 0, 0, 1, 0), as in the original PIL AutoAugment
  (the reference's TF matrix shears about the first pixel's centre instead, s/2 pixels away); TranslateX
  by t is (1, 0, t, 0, 1, 0). Pixels from outside the image are 128, as is Cutout's square. A pixel whose
  input point lies within float32 precision of a pixel edge may take the other neighbour.

Sizes: the pixel constants are meant for 224x224 images. Translate and Cutout keep them exactly at 224 and
scale them by min(H, W) / 224, computed in the graph: the translation stays in float pixels (the transform
picks the nearest pixel), the Cutout half-size is rounded half up to whole pixels.

Randomness is stateless: every draw comes from tf.random.stateless_uniform with a sub-seed derived from the
image's [2] int64 `seed` as seed + [k, 0], so an image gets the same augmentation whatever thread of a
parallel map runs it (preprocessing uses k = 0 for the crop and k = 1 for the flip):
- k = 100: the choice, AutoAugment's sub-policy (uniform over 25) or RandAugment's num_layers ops (uniform
  over the 16 of OPS, drawn independently);
- k = 101 + 2i: step i's two uniform draws: whether it applies (AutoAugment: when below the step's
  probability) and its sign (negative when below 0.5);
- k = 102 + 2i: the seed step i hands to its op (Cutout's centre).
"""
import collections
import math

import tensorflow as tf

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
       "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")
POLICIES = ("none", "autoaugment", "randaugment")

MAX_LEVEL = 10.0
FILL = 128
REFERENCE_SIZE = 224.0

Constants = collections.namedtuple("Constants", "cutout translate")
CONSTANTS = {"autoaugment": Constants(cutout=100, translate=250),
             "randaugment": Constants(cutout=40, translate=100)}

# AutoAugment policy v0: 25 sub-policies of two (op, probability, level) steps.
AUTOAUGMENT_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)

CHOICE_KEY = 100
STEP_KEY = 101

# The entry points build plain graph ops (their control flow is tf.switch_case): inside a tf.data map function
# AutoGraph would otherwise convert every function they call, seconds of graph building for nothing.
_plain_graph = tf.autograph.experimental.do_not_convert


def _int_argument(level, maximum):
    """int32 int(level / 10 * maximum) of a float64 level >= 0."""
    return tf.cast(tf.floor(level / MAX_LEVEL * maximum), tf.int32)


def _bins():
    return tf.range(256, dtype=tf.int32)


# --------------------------------------------------------------------------- point ops: one 256-entry table


def _invert_table(level):
    return 255 - _bins()


def _posterize_table(level):
    bits = tf.clip_by_value(_int_argument(level, 4), 1, 8)
    return tf.bitwise.bitwise_and(_bins(), 256 - tf.bitwise.left_shift(1, 8 - bits))


def _solarize_table(level):
    bins = _bins()
    return tf.compat.v1.where_v2(bins < _int_argument(level, 256), bins, 255 - bins)


def _solarize_add_table(level):
    bins = _bins()
    return tf.compat.v1.where_v2(bins < 128, tf.minimum(bins + _int_argument(level, 110), 255), bins)


_POINT_TABLES = {"Invert": _invert_table, "Posterize": _posterize_table, "Solarize": _solarize_table,
                 "SolarizeAdd": _solarize_add_table}


def _point(image, table):
    return tf.gather(tf.cast(table, tf.uint8), tf.cast(image, tf.int32))


# --------------------------------------------------------------------------- per-channel histogram ops


def _channel_bins(image):
    """int32 [H, W, 3]: the pixel values, channel c's moved to c * 256 + value (one index space for 3 tables)."""
    return tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)


def _histograms(image):
    """[3, 256] int32 per-channel histograms."""
    counts = tf.math.bincount(tf.reshape(_channel_bins(image), [-1]), minlength=768, maxlength=768,
                              dtype=tf.int32)
    return tf.reshape(counts, [3, 256])


def _channel_tables(image, tables):
    """Each channel through its row of the [3, 256] int32 tables."""
    return tf.gather(tf.cast(tf.reshape(tables, [-1]), tf.uint8), _channel_bins(image))


def _autocontrast_tables(image):
    # PIL's int(i * scale - lo * scale) in float64. lo * scale is read from the i * scale table rather than
    # multiplied again, so that Grappler cannot rewrite the difference as (i - lo) * scale (other roundings).
    values = tf.reshape(image, [-1, 3])
    lo = tf.cast(tf.reduce_min(values, axis=0), tf.int32)[:, tf.newaxis]
    hi = tf.cast(tf.reduce_max(values, axis=0), tf.int32)[:, tf.newaxis]
    scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
    scaled = tf.cast(_bins(), tf.float64)[tf.newaxis] * scale
    offset = tf.gather(scaled, lo, axis=1, batch_dims=1)
    stretched = tf.cast(tf.clip_by_value(scaled - offset, 0.0, 255.0), tf.int32)
    return tf.compat.v1.where_v2(hi > lo, stretched, _bins())


def _equalize_tables(image):
    histograms = _histograms(image)
    bins = _bins()
    last = tf.reduce_max(tf.compat.v1.where_v2(histograms > 0, bins, -1), axis=1, keepdims=True)
    last_count = tf.reduce_sum(tf.compat.v1.where_v2(tf.equal(bins, last), histograms, 0), axis=1,
                               keepdims=True)
    # PIL's step: 0 (channel left unchanged) when fewer than 255 pixels lie below the channel's top value.
    step = (tf.reduce_sum(histograms, axis=1, keepdims=True) - last_count) // 255
    below = tf.cumsum(histograms, axis=1, exclusive=True)
    equalized = tf.minimum((step // 2 + below) // tf.maximum(step, 1), 255)
    return tf.compat.v1.where_v2(step > 0, equalized, bins)


_CHANNEL_TABLES = {"AutoContrast": _autocontrast_tables, "Equalize": _equalize_tables}


# --------------------------------------------------------------------------- PIL.ImageEnhance ops


def _grey(image):
    """int32 [H, W, 1]: PIL's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point)."""
    weighted = tf.cast(image, tf.int32) * tf.constant([19595, 38470, 7471], tf.int32)
    return tf.bitwise.right_shift(tf.reduce_sum(weighted, axis=-1, keepdims=True) + 0x8000, 16)


def _mean_grey(image):
    grey = tf.cast(_grey(image), tf.float64)
    return tf.floor(tf.reduce_mean(grey) + 0.5) * tf.ones_like(grey)


def _black(image):
    return tf.zeros_like(image, tf.int32)


def _smooth(image):
    """PIL's ImageFilter.SMOOTH ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded) inside, border kept."""
    weights = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32)[:, :, tf.newaxis, tf.newaxis]
    # Sums of integers below 2 ** 24: exact in float32.
    total = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[tf.newaxis], tf.tile(weights, [1, 1, 3, 1]),
                                   [1, 1, 1, 1], "VALID")[0]
    inside = (2 * tf.cast(total, tf.int32) + 13) // 26
    pixels = tf.cast(image, tf.int32)
    return pixels + tf.pad(inside - pixels[1:-1, 1:-1], [[1, 1], [1, 1], [0, 0]])


_DEGENERATES = {"Color": _grey, "Contrast": _mean_grey, "Brightness": _black, "Sharpness": _smooth}


def _blend(degenerate, image, level):
    """PIL's Image.blend(degenerate, image, factor) with the level's factor: float32, clipped, truncated."""
    factor = tf.cast(level / MAX_LEVEL * 1.8 + 0.1, tf.float32)
    degenerate = tf.cast(degenerate, tf.float32)
    blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


# --------------------------------------------------------------------------- geometric ops


def _scaled_pixels(pixels, image):
    """float64 pixels (a constant meant for 224x224) times min(H, W) / 224."""
    shape = tf.shape(image)
    return pixels * tf.cast(tf.minimum(shape[0], shape[1]), tf.float64) / REFERENCE_SIZE


def _amount(name, level, image, constants):
    """The geometric op's argument, float64: radians, shear factor or pixels."""
    fraction = level / MAX_LEVEL
    if name == "Rotate":
        return fraction * 30.0 * (math.pi / 180.0)
    if name in ("ShearX", "ShearY"):
        return fraction * 0.3
    return _scaled_pixels(fraction * constants.translate, image)


def _affine_data(name, amount, height, width):
    """PIL's AFFINE data (a, b, c, d, e, f) of a geometric op, python or float64 scalars: the output pixel whose
    centre is (X, Y) (PIL's coordinates: pixel (x, y) covers [x, x + 1) x [y, y + 1)) takes the input pixel
    containing (a X + b Y + c, d X + e Y + f). amount: the signed radians, shear factor or pixels."""
    if name == "Rotate":
        cos, sin = tf.cos(amount), tf.sin(amount)
        centre_x, centre_y = width / 2.0, height / 2.0
        return [cos, -sin, centre_x - cos * centre_x + sin * centre_y,
                sin, cos, centre_y - sin * centre_x - cos * centre_y]
    return {"ShearX": [1.0, amount, 0.0, 0.0, 1.0, 0.0], "ShearY": [1.0, 0.0, 0.0, amount, 1.0, 0.0],
            "TranslateX": [1.0, 0.0, amount, 0.0, 1.0, 0.0], "TranslateY": [1.0, 0.0, 0.0, 0.0, 1.0, amount]}[name]


def _kernel_row(data):
    """The projective kernel's [1, 8] float32 transform for PIL's AFFINE data, on the image padded by one pixel
    at the top and left (see _affine).

    The kernel maps output pixel indices to input indices, pixel centres at integers, and rounds to the
    nearest; PIL maps pixel centres (indices + 0.5) and takes the pixel containing the point (floor). So the
    offsets are the points of the first centre, c + (a + b) / 2 and f + (d + e) / 2, less 0.5, plus 1 for the
    padding. Like PIL, all six numbers are rounded to 16.16 fixed point first, so that nearest-neighbour ties
    (a shear at some levels puts whole rows exactly between two pixels) go PIL's way. (PIL computes pure
    translations in double: the rounding changes them only for offsets within 2**-17 pixels of a pixel edge.)"""
    a, b, c, d, e, f = data
    pil = tf.cast(tf.stack([a, b, c + (a + b) / 2.0, d, e, f + (d + e) / 2.0]), tf.float64)
    fixed_point = tf.floor(pil * 65536.0 + 0.5) / 65536.0
    row = fixed_point + tf.constant([0.0, 0.0, 0.5, 0.0, 0.0, 0.5], tf.float64)
    return tf.cast(tf.concat([row, tf.zeros([2], tf.float64)], 0)[tf.newaxis], tf.float32)


def _projective_transform(images, transforms, output_shape):
    """uint8 [N, H, W, C] through [1, 8] float32 transforms into [N, output_shape, C], nearest neighbour, 128
    for the pixels from outside the input.

    TF 2.x has the kernel in core with a fill value (ImageProjectiveTransformV3). TF 1.15 has it only in
    tf.contrib.image (ImageProjectiveTransformV2), which fills with 0: a channel of ones travels with the
    image and marks, where it came out 0, the pixels to fill."""
    if hasattr(tf.raw_ops, "ImageProjectiveTransformV3"):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=output_shape, fill_value=float(FILL),
            interpolation="NEAREST", fill_mode="CONSTANT")
    marked = tf.concat([images, tf.ones_like(images[..., :1])], axis=-1)
    moved = tf.contrib.image.transform(marked, transforms, interpolation="NEAREST", output_shape=output_shape)
    inside = tf.equal(moved[..., -1:], 1)
    return tf.compat.v1.where_v2(inside, moved[..., :-1], tf.constant(FILL, tf.uint8))


def _affine(image, name, amount):
    """The kernel rounds half away from zero where PIL floors: they differ only at -0.5, PIL's coordinate 0
    (the first pixel's edge). On a copy padded with one pixel of 128 at the top and left, that edge is at 0.5."""
    shape = tf.shape(image)
    data = _affine_data(name, amount, tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64))
    padded = tf.pad(image, [[1, 0], [1, 0], [0, 0]], constant_values=FILL)
    return _projective_transform(padded[tf.newaxis], _kernel_row(data), shape[:2])[0]


_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


# --------------------------------------------------------------------------- cutout


def _cutout(image, level, seed, constants):
    """A square of side 2 * half-size (clipped to the image) about a uniformly drawn pixel, filled with 128."""
    shape = tf.shape(image)
    half_at_224 = tf.cast(_int_argument(level, constants.cutout), tf.float64)
    half = tf.cast(tf.floor(_scaled_pixels(half_at_224, image) + 0.5), tf.int32)
    # minimum(): a float32 draw just below 1 can round up to the size itself.
    draws = tf.random.stateless_uniform([2], seed) * tf.cast(shape[:2], tf.float32)
    centre = tf.minimum(tf.cast(draws, tf.int32), shape[:2] - 1)
    rows = tf.range(shape[0])
    cols = tf.range(shape[1])
    inside_rows = tf.logical_and(rows >= centre[0] - half, rows < centre[0] + half)
    inside_cols = tf.logical_and(cols >= centre[1] - half, cols < centre[1] + half)
    inside = tf.logical_and(inside_rows[:, tf.newaxis, tf.newaxis], inside_cols[tf.newaxis, :, tf.newaxis])
    return tf.compat.v1.where_v2(inside, tf.constant(FILL, tf.uint8), image)


# --------------------------------------------------------------------------- one op


@_plain_graph
def apply_op(image, name, level, sign=1.0, seed=None, constants="randaugment"):
    """The op `name` of OPS at `level` on a uint8 [H, W, 3] image of any size -> uint8, same shape.

    level: python float (or float tensor) from 0 to 10, may exceed 10. sign: +1 or -1 (python float or float
    tensor), turns Rotate, ShearX/Y and TranslateX/Y the other way. seed: [2] int64 stateless seed, places
    Cutout's square. constants: "autoaugment" or "randaugment", the pixel constants of CONSTANTS."""
    consts = CONSTANTS[constants]
    level = tf.cast(level, tf.float64)
    if name in _POINT_TABLES:
        out = _point(image, _POINT_TABLES[name](level))
    elif name in _CHANNEL_TABLES:
        out = _channel_tables(image, _CHANNEL_TABLES[name](image))
    elif name in _DEGENERATES:
        out = _blend(_DEGENERATES[name](image), image, level)
    elif name in _GEOMETRIC:
        out = _affine(image, name, _amount(name, level, image, consts) * tf.cast(sign, tf.float64))
    elif name == "Cutout":
        if seed is None:
            raise ValueError("Cutout needs a seed (a [2] int64 tensor) for the position of its square")
        out = _cutout(image, level, seed, consts)
    else:
        raise ValueError("unknown augmentation op {!r} (expected one of: {})".format(name, ", ".join(OPS)))
    out.set_shape(image.shape)
    return out


# --------------------------------------------------------------------------- draws


def _sub_seed(seed, k):
    return seed + tf.constant([k, 0], seed.dtype)


@_plain_graph
def subpolicy_index(seed):
    """int32 scalar: the AutoAugment sub-policy (index into AUTOAUGMENT_V0) drawn for seed."""
    return tf.random.stateless_uniform([], _sub_seed(seed, CHOICE_KEY), minval=0,
                                       maxval=len(AUTOAUGMENT_V0), dtype=tf.int32)


@_plain_graph
def randaugment_op_indices(seed, num_layers):
    """int32 [num_layers]: the RandAugment ops (indices into OPS) drawn for seed."""
    return tf.random.stateless_uniform([num_layers], _sub_seed(seed, CHOICE_KEY), minval=0,
                                       maxval=len(OPS), dtype=tf.int32)


@_plain_graph
def step_draws(seed, step):
    """(float32 uniform deciding whether step `step` applies, its sign +1.0 or -1.0, its op's seed)."""
    draws = tf.random.stateless_uniform([2], _sub_seed(seed, STEP_KEY + 2 * step))
    sign = tf.compat.v1.where_v2(draws[1] < 0.5, -1.0, 1.0)
    return draws[0], sign, _sub_seed(seed, STEP_KEY + 2 * step + 1)


# --------------------------------------------------------------------------- policies


def _autoaugment_step(image, seed, subpolicy, step):
    """Step `step` of the drawn sub-policy: one branch per op that step uses anywhere in the policy, at the
    level gathered for the sub-policy (rather than one branch per sub-policy: a third of the graph)."""
    names = sorted({steps[step][0] for steps in AUTOAUGMENT_V0})
    column = [steps[step] for steps in AUTOAUGMENT_V0]
    name_index = tf.gather([names.index(name) for name, _, _ in column], subpolicy)
    probability = tf.gather(tf.constant([p for _, p, _ in column], tf.float32), subpolicy)
    level = tf.gather(tf.constant([level for _, _, level in column], tf.float64), subpolicy)
    uniform, sign, op_seed = step_draws(seed, step)
    branch = tf.compat.v1.where_v2(uniform < probability, name_index, len(names))
    branches = [lambda name=name: apply_op(image, name, level, sign, op_seed, "autoaugment") for name in names]
    return tf.switch_case(branch, branches + [lambda: image])


@_plain_graph
def autoaugment(image, seed):
    """AutoAugment policy v0: one of the 25 sub-policies drawn per image, each of its two steps applied with
    its probability, at its level, with a random sign (all from the stateless seed)."""
    subpolicy = subpolicy_index(seed)
    out = image
    for step in range(2):
        out = _autoaugment_step(out, seed, subpolicy, step)
    out.set_shape(image.shape)
    return out


@_plain_graph
def randaugment(image, seed, num_layers=2, magnitude=10.0):
    """RandAugment: num_layers ops drawn uniformly from OPS (independently), each applied at `magnitude` with a
    random sign (all from the stateless seed)."""
    indices = randaugment_op_indices(seed, num_layers)
    out = image
    for layer in range(num_layers):
        _, sign, op_seed = step_draws(seed, layer)
        branches = [lambda name=name, out=out, sign=sign, op_seed=op_seed: apply_op(
            out, name, magnitude, sign, op_seed, "randaugment") for name in OPS]
        out = tf.switch_case(indices[layer], branches)
    out.set_shape(image.shape)
    return out


@_plain_graph
def augment(image, policy, seed, num_layers=2, magnitude=10.0):
    """uint8 [H, W, 3] image through the policy of POLICIES; "none" returns it unchanged."""
    if policy == "none":
        return image
    if policy == "autoaugment":
        return autoaugment(image, seed)
    if policy == "randaugment":
        return randaugment(image, seed, num_layers, magnitude)
    raise ValueError("unknown augmentation policy {!r} (expected one of: {})".format(
        policy, ", ".join(POLICIES)))
