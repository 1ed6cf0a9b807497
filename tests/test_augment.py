"""Tests for effnet_exp.data.augment on real photographs (scikit-learn's china.jpg and flower.jpg), with PIL as
the independent oracle: graph mode on TF 1.15 and TF 2.x."""
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps
from sklearn.datasets import load_sample_image

from effnet_exp.data import augment

FILL = (128, 128, 128)
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
ENHANCERS = ("Color", "Contrast", "Brightness", "Sharpness")


@pytest.fixture(scope="module")
def photos():
    """427x640 photographs, a 224x224 and a 112x112 crop, and an odd 61x97 crop."""
    china = load_sample_image("china.jpg")
    flower = load_sample_image("flower.jpg")
    return {"china": china, "flower": flower, "china224": china[100:324, 200:424],
            "flower112": flower[150:262, 250:362], "flower61x97": flower[13:74, 301:398]}


def _edge_images():
    """Histogram edge cases: a constant channel, a two-valued one, and 511 zeros with one 255 (PIL's equalize
    table gives 256 there); then small random and low-contrast images."""
    rng = np.random.RandomState(0)
    edge = np.zeros((16, 32, 3), np.uint8)
    edge[0, 0, 0] = 255
    edge[..., 1] = 77
    edge[..., 2] = rng.choice([3, 200], size=(16, 32))
    noisy = [rng.randint(0, 256, size=(5, 7, 3)).astype(np.uint8) for _ in range(20)]
    flat = [rng.randint(100, 104, size=(9, 11, 3)).astype(np.uint8) for _ in range(5)]
    return [edge] + noisy + flat


def _evaluate(build, images, shape=(None, None, 3)):
    """build(uint8 image placeholder) -> fetches, evaluated for each image in one graph."""
    with tf.Graph().as_default():
        image = tf.compat.v1.placeholder(tf.uint8, shape)
        fetches = build(image)
        with tf.compat.v1.Session() as sess:
            return [sess.run(fetches, {image: im}) for im in images]


def _pil(image):
    return Image.fromarray(image)


def _assert_equal(ours, expected, what):
    expected = np.asarray(expected)
    assert ours.dtype == np.uint8 and ours.shape == expected.shape, what
    differ = np.count_nonzero(ours != expected)
    assert differ == 0, "{}: {} values differ".format(what, differ)


# --------------------------------------------------------------------------- pixel ops


def _posterize_bits(level):
    # int(level / 10 * 4) bits, at least 1 (the documented clamp: the reference's 0 bits keep 1) and at most 8.
    return min(max(int(level / 10.0 * 4), 1), 8)


IMAGEOPS_CASES = ([("Invert", 0, ImageOps.invert), ("AutoContrast", 0, ImageOps.autocontrast),
                   ("Equalize", 0, ImageOps.equalize)] +
                  [("Posterize", level, lambda im, level=level: ImageOps.posterize(im, _posterize_bits(level)))
                   for level in (0, 2, 2.5, 5, 7.5, 10, 25)] +
                  [("Solarize", level, lambda im, level=level: ImageOps.solarize(im, int(level / 10.0 * 256)))
                   for level in (0, 3, 5, 8, 10, 12)])


def test_imageops_equal_pil(photos):
    images = list(photos.values()) + _edge_images()
    outputs = _evaluate(lambda image: [augment.apply_op(image, name, level) for name, level, _ in IMAGEOPS_CASES],
                        images)
    for image, outs in zip(images, outputs):
        for (name, level, pil_op), ours in zip(IMAGEOPS_CASES, outs):
            _assert_equal(ours, pil_op(_pil(image)), "{} {} on {}".format(name, level, image.shape))


def test_solarize_add_follows_the_reference_definition(photos):
    levels = (0, 3, 7, 10, 15)
    images = list(photos.values())
    outputs = _evaluate(lambda image: [augment.apply_op(image, "SolarizeAdd", level) for level in levels], images)
    for image, outs in zip(images, outputs):
        for level, ours in zip(levels, outs):
            added = np.minimum(image.astype(np.int32) + int(level / 10.0 * 110), 255)
            _assert_equal(ours, np.where(image < 128, added, image).astype(np.uint8), "SolarizeAdd {}".format(level))


def test_enhancers_within_one_grey_level_of_pil(photos):
    # Factors 0.1, 0.5, 1.0 and 1.9 (level / 10 * 1.8 + 0.1). Contrast: PIL blends against the rounded mean of
    # the greyscale image, the documented behaviour (not the reference's pixel count / 256).
    levels = (0, 20 / 9.0, 5, 10)
    images = list(photos.values()) + _edge_images()[:1]
    outputs = _evaluate(lambda image: {(name, level): augment.apply_op(image, name, level)
                                       for name in ENHANCERS for level in levels}, images)
    for image, outs in zip(images, outputs):
        for (name, level), ours in outs.items():
            factor = level / 10.0 * 1.8 + 0.1
            expected = np.asarray(getattr(ImageEnhance, name)(_pil(image)).enhance(factor))
            worst = np.abs(ours.astype(np.int32) - expected).max()
            assert ours.dtype == np.uint8 and worst <= 1, (name, factor, image.shape, worst)


# --------------------------------------------------------------------------- geometric ops


def _pil_affine_data(name, level, sign, height, width, translate_const):
    """PIL's AFFINE data (a, b, c, d, e, f): output pixel (x, y), centre (X, Y) = (x + 0.5, y + 0.5), takes the
    input pixel containing (a X + b Y + c, d X + e Y + f) (NEAREST), FILL when that is outside."""
    if name == "Rotate":
        # Image.rotate's matrix: counter-clockwise by the angle about the centre (width / 2, height / 2).
        angle = math.radians(level / 10.0 * 30.0 * sign)
        cos, sin = math.cos(angle), math.sin(angle)
        cx, cy = width / 2.0, height / 2.0
        return (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    shear = level / 10.0 * 0.3 * sign
    shift = level / 10.0 * translate_const * min(height, width) / 224.0 * sign
    return {"ShearX": (1, shear, 0, 0, 1, 0), "ShearY": (1, 0, 0, shear, 1, 0),
            "TranslateX": (1, 0, shift, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, shift)}[name]


def _pil_affine(image, data):
    height, width = image.shape[:2]
    return np.asarray(_pil(image).transform((width, height), Image.AFFINE, data, resample=Image.NEAREST,
                                            fillcolor=FILL))


def _assert_equal_but_ties(ours, expected, data, what):
    """Equal except at nearest-neighbour ties: pixels whose input point lies within 0.01 pixel of a pixel edge,
    where PIL's 16.16 fixed-point coordinates and the kernel's float32 ones may pick different neighbours."""
    assert ours.dtype == np.uint8 and ours.shape == expected.shape, what
    rows, cols = np.nonzero(np.any(ours != expected, axis=-1))
    a, b, c, d, e, f = data
    u = a * (cols + 0.5) + b * (rows + 0.5) + c
    v = d * (cols + 0.5) + e * (rows + 0.5) + f
    to_edge = np.minimum(np.abs(u - np.round(u)), np.abs(v - np.round(v)))
    assert np.all(to_edge < 0.01), "{}: {} pixels differ away from a pixel edge".format(what, len(rows))
    assert len(rows) <= 1e-3 * ours.shape[0] * ours.shape[1], "{}: {} pixels differ".format(what, len(rows))


def test_geometric_ops_equal_pil_affine(photos):
    levels = (3, 4, 7, 10)  # level 4: a shear with whole rows of exact ties (0.12 * (y + 0.5) + 0.5 integer)
    cases = [(name, level, sign, "randaugment") for name in GEOMETRIC for level in levels for sign in (1.0, -1.0)]
    cases += [(name, level, sign, "autoaugment") for name in GEOMETRIC[3:] for level in (4, 9) for sign in (1.0, -1.0)]
    # The mapping does not depend on the content: one full-size photograph, and the crops.
    images = [photos[name] for name in ("china", "china224", "flower112", "flower61x97")]
    outputs = _evaluate(lambda image: [augment.apply_op(image, name, level, sign, constants=constants)
                                       for name, level, sign, constants in cases], images)
    for image, outs in zip(images, outputs):
        height, width = image.shape[:2]
        for (name, level, sign, constants), ours in zip(cases, outs):
            data = _pil_affine_data(name, level, sign, height, width, augment.CONSTANTS[constants].translate)
            what = "{} {} {} {} on {}".format(name, level, sign, constants, image.shape)
            _assert_equal_but_ties(ours, _pil_affine(image, data), data, what)
            if name == "Rotate":  # the sign convention: +level turns as PIL's Image.rotate(+degrees)
                rotated = _pil(image).rotate(level * 3.0 * sign, resample=Image.NEAREST, fillcolor=FILL)
                _assert_equal_but_ties(ours, np.asarray(rotated), data, what + " (Image.rotate)")


def test_translate_constants_are_the_references_at_224_and_scale_with_size(photos):
    # TranslateX at level 10 (randaugment, 100 pixels at 224) and level 4 (autoaugment, 0.4 * 250 = 100).
    cases = [("TranslateX", 10, sign, "randaugment") for sign in (1.0, -1.0)] + [
        ("TranslateX", 4, 1.0, "autoaugment")]
    images = [photos["china224"], photos["flower112"]]
    outputs = _evaluate(lambda image: [augment.apply_op(image, name, level, sign, constants=constants)
                                       for name, level, sign, constants in cases], images)
    for image, outs in zip(images, outputs):
        shift = 100 * image.shape[1] // 224
        for (_, _, sign, _), ours in zip(cases, outs):
            moved, filled = (ours[:, :-shift], ours[:, -shift:]) if sign > 0 else (ours[:, shift:], ours[:, :shift])
            assert np.array_equal(moved, image[:, shift:] if sign > 0 else image[:, :-shift])
            assert np.all(filled == 128)


# --------------------------------------------------------------------------- cutout


def _square(changed):
    """(top, left, height, width) of the changed pixels, which must form one filled rectangle."""
    rows = np.nonzero(changed.any(axis=1))[0]
    cols = np.nonzero(changed.any(axis=0))[0]
    top, left, height, width = rows[0], cols[0], rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    assert changed[top:top + height, left:left + width].all() and changed.sum() == height * width
    return top, left, height, width


def _assert_side(start, side, half, size):
    """The square's side along one axis: 2 * half, or clipped (at least half) where it touches the border."""
    if start == 0 or start + side == size:
        assert half <= side <= 2 * half
    else:
        assert side == 2 * half


def test_cutout_fills_one_square_placed_by_the_seed(photos):
    # (level, constants) -> half-size at 224: randaugment 10 -> int(1.0 * 40) = 40, autoaugment 5 -> 50.
    cases = [(10, "randaugment", 40), (5, "autoaugment", 50)]
    seeds = [[s, 3] for s in range(10)]
    expected_half = {224: {40: 40, 50: 50}, 112: {40: 20, 50: 25}}  # the reference's at 224, half at 112
    names = ["china224", "flower112", "china", "flower61x97"]
    # No 128 in the inputs: the changed pixels are then exactly the square.
    images = [np.where(photos[name] == 128, 127, photos[name]).astype(np.uint8) for name in names]
    with tf.Graph().as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3])
        seed = tf.compat.v1.placeholder(tf.int64, [2])
        outs = [augment.apply_op(image, "Cutout", level, seed=seed, constants=constants)
                for level, constants, _ in cases]
        with tf.compat.v1.Session() as sess:
            for im in images:
                height, width = im.shape[:2]
                corners = set()
                for s in seeds:
                    results = sess.run(outs, {image: im, seed: s})
                    again = sess.run(outs, {image: im, seed: s})
                    for (_, _, half_224), ours, repeat in zip(cases, results, again):
                        assert np.array_equal(ours, repeat)
                        half = int(math.floor(half_224 * min(height, width) / 224.0 + 0.5))
                        if min(height, width) in expected_half:
                            assert half == expected_half[min(height, width)][half_224]
                        changed = np.any(ours != im, axis=-1)
                        top, left, side_y, side_x = _square(changed)
                        _assert_side(top, side_y, half, height)
                        _assert_side(left, side_x, half, width)
                        assert np.all(ours[changed] == 128) and np.array_equal(ours[~changed], im[~changed])
                        corners.add((top, left))
                assert len(corners) >= 10


# --------------------------------------------------------------------------- policies


def _documented_draws(seed, num_layers):
    """The draws of the module docstring's scheme (sub-seeds seed + [k, 0]): AutoAugment's sub-policy,
    RandAugment's ops, and per step a uniform (does it apply) and a sign."""
    def sub_seed(k):
        return seed + tf.constant([k, 0], tf.int64)
    steps = [tf.random.stateless_uniform([2], sub_seed(101 + 2 * step)) for step in range(num_layers)]
    return {"subpolicy": tf.random.stateless_uniform([], sub_seed(100), 0, 25, tf.int32),
            "ops": tf.random.stateless_uniform([num_layers], sub_seed(100), 0, 16, tf.int32),
            "uniforms": [draws[0] for draws in steps],
            "signs": [tf.compat.v1.where_v2(draws[1] < 0.5, -1.0, 1.0) for draws in steps]}


def _through_steps(steps, constants):
    """build(image) for the image through (name, level, sign, op seed) steps, one apply_op each."""
    def build(image):
        for name, level, sign, op_seed in steps:
            image = augment.apply_op(image, name, level, sign, tf.constant(op_seed), constants)
        return image
    return build


def _expected_builds(seed, drawn):
    """{policy: build(image)} from the documented draws: AutoAugment's steps below their probability, the
    RandAugment ops (at magnitude 10 with 2 layers, 5 with 3), each step's op seeded with seed + [102 + 2i, 0]."""
    op_seeds = [np.asarray(seed, np.int64) + [102 + 2 * step, 0] for step in range(3)]
    subpolicy = augment.AUTOAUGMENT_V0[drawn["subpolicy"]]
    aa_steps = [(name, level, drawn["signs"][step], op_seeds[step])
                for step, (name, probability, level) in enumerate(subpolicy)
                if drawn["uniforms"][step] < probability]

    def ra_steps(count, magnitude):
        return [(augment.OPS[index], magnitude, drawn["signs"][step], op_seeds[step])
                for step, index in enumerate(drawn["ops" + str(count)])]
    return {"aa": _through_steps(aa_steps, "autoaugment"), "ra": _through_steps(ra_steps(2, 10.0), "randaugment"),
            "ra3": _through_steps(ra_steps(3, 5.0), "randaugment")}


def test_policies_apply_their_drawn_steps(photos):
    """Each policy equals the ops its seed draws (the module docstring's scheme) applied one by one with
    apply_op; randaugment applies exactly num_layers ops; the same seed repeats the output, different seeds
    vary it; static shape and dtype are kept."""
    image = photos["china224"]
    seeds = [[s, 11] for s in range(20)]
    with tf.Graph().as_default():
        placeholder = tf.compat.v1.placeholder(tf.uint8, [224, 224, 3])
        seed = tf.compat.v1.placeholder(tf.int64, [2])
        policies = {"aa": augment.augment(placeholder, "autoaugment", seed),
                    "ra": augment.augment(placeholder, "randaugment", seed),
                    "ra3": augment.randaugment(placeholder, seed, num_layers=3, magnitude=5.0),
                    "ra0": augment.randaugment(placeholder, seed, num_layers=0)}
        documented = _documented_draws(seed, 3)
        documented["ops2"] = _documented_draws(seed, 2)["ops"]
        documented["ops3"] = documented.pop("ops")
        helpers = {"subpolicy": augment.subpolicy_index(seed), "ops2": augment.randaugment_op_indices(seed, 2),
                   "ops3": augment.randaugment_op_indices(seed, 3),
                   "uniforms": [augment.step_draws(seed, step)[0] for step in range(3)],
                   "signs": [augment.step_draws(seed, step)[1] for step in range(3)]}
        ops = [augment.apply_op(placeholder, name, 7, 1.0, seed) for name in augment.OPS]
        for out in list(policies.values()) + ops:
            assert out.dtype == tf.uint8 and out.shape.as_list() == [224, 224, 3]
        with tf.compat.v1.Session() as sess:
            results = [sess.run([policies, documented, helpers], {placeholder: image, seed: s}) for s in seeds]
            again = sess.run(policies, {placeholder: image, seed: seeds[0]})

    for _, drawn, helped in results:
        for key, value in drawn.items():
            assert np.array_equal(helped[key], value), key
    checked = results[:8]
    expected = [_expected_builds(s, drawn) for s, (_, drawn, _) in zip(seeds, checked)]
    built = _evaluate(lambda placeholder: [{key: build(placeholder) for key, build in builds.items()}
                                           for builds in expected], [image])[0]
    for (outs, _, _), wanted in zip(checked, built):
        assert np.array_equal(outs["ra0"], image)
        for key, value in wanted.items():
            assert np.array_equal(outs[key], value), key
    for key in ("aa", "ra"):
        assert np.array_equal(again[key], results[0][0][key])
        assert len({outs[key].tobytes() for outs, _, _ in results}) >= 10, key


def _chi_square(indices, bins):
    counts = np.bincount(indices, minlength=bins)
    expected = len(indices) / float(bins)
    return ((counts - expected) ** 2 / expected).sum()


def test_choices_are_uniform():
    """Sub-policy and op choices over 2500 seeds: chi-square below the 0.1% quantile (51.2 for 24 degrees of
    freedom, 37.7 for 15). The seeds are fixed, so the outcome is too."""
    with tf.Graph().as_default():
        seeds = tf.data.Dataset.range(2500).map(lambda i: tf.stack([i, tf.constant(7, tf.int64)]))
        choices = seeds.map(lambda s: (augment.subpolicy_index(s), augment.randaugment_op_indices(s, 1)[0]))
        batch = tf.compat.v1.data.make_one_shot_iterator(choices.batch(2500)).get_next()
        with tf.compat.v1.Session() as sess:
            subpolicies, ops = sess.run(batch)
    assert _chi_square(subpolicies, 25) < 51.2
    assert _chi_square(ops, 16) < 37.7


def test_policies_in_a_parallel_dataset_map(photos):
    """Per-element stateless seeds: a map with 4 parallel calls gives what a sequential map gives."""
    crops = np.stack([photos[name][y:y + 61, x:x + 97] for name in ("china", "flower")
                      for y, x in ((0, 0), (120, 200), (300, 500), (200, 40))])
    seeds = np.stack([np.arange(len(crops)), np.full(len(crops), 5)], axis=1).astype(np.int64)

    def policies(image, seed):
        return augment.augment(image, "autoaugment", seed), augment.augment(image, "randaugment", seed)

    with tf.Graph().as_default():
        elements = tf.data.Dataset.from_tensor_slices((crops, seeds))
        batches = [tf.compat.v1.data.make_one_shot_iterator(
            elements.map(policies, num_parallel_calls=calls).batch(len(crops))).get_next() for calls in (4, 1)]
        with tf.compat.v1.Session() as sess:
            parallel, sequential = sess.run(batches)
    for ours, theirs in zip(parallel, sequential):
        assert ours.dtype == np.uint8 and ours.shape == crops.shape
        assert np.array_equal(ours, theirs)
        assert len({image.tobytes() for image in ours}) == len(crops)


def test_dispatch_and_errors():
    with tf.Graph().as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3])
        seed = tf.constant([1, 2], tf.int64)
        assert augment.augment(image, "none", seed) is image
        for op in augment.OPS[:3]:
            assert augment.apply_op(image, op, 5).shape.as_list() == [None, None, 3]
        with pytest.raises(ValueError, match="unknown augmentation policy 'autoaugment_v1'"):
            augment.augment(image, "autoaugment_v1", seed)
        with pytest.raises(ValueError, match="unknown augmentation op 'Blur'"):
            augment.apply_op(image, "Blur", 5)
        with pytest.raises(ValueError, match="Cutout needs a seed"):
            augment.apply_op(image, "Cutout", 5)
    assert augment.POLICIES == ("none", "autoaugment", "randaugment") and len(set(augment.OPS)) == 16
