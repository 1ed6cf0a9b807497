"""See what the model sees: training views of images, or one augmentation op applied to them.

    python -m effnet_exp.tools.preview_augment IMAGE [IMAGE ...] --out grid.png [--samples 8] [run.py overrides]
    python -m effnet_exp.tools.preview_augment IMAGE [IMAGE ...] --op NAME --magnitude M --out DIR [run.py overrides]

Grid mode: one row per image, `--samples` training views in each, made by the run's whole training preprocessing
(crop, flip, resize, `dataset.augment`, then the batch mixing of `train.mixup_alpha` / `train.cutmix_alpha` across
all the views), the views seeded like the input pipeline's images 0, 1, 2, ... with the run's `seed`. Shown on the
0-255 scale, before normalisation.

Op mode: applies the op always, with a positive sign, at level `--magnitude`, to each whole decoded image at its own
size, and writes DIR/<image file stem>.png (lossless). The translate and cutout constants are those of
`dataset.augment` (autoaugment's, else randaugment's), scaled with the image's shorter side as in training.
"""
import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's first import: no C++ start-up banner

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from effnet_exp.config import compose_run_config, requested_image_size  # noqa: E402
from effnet_exp.data import augment  # noqa: E402
from effnet_exp.data.config import AugmentPolicy  # noqa: E402
from effnet_exp.data.preprocessing import preprocess_image  # noqa: E402
from effnet_exp.errors import UserError  # noqa: E402
from effnet_exp.training import mixing  # noqa: E402
from effnet_exp.validate import validate  # noqa: E402

GAP = 2  # pixels between the cells of the grid


def run_config(overrides):
    """The RunConfig that `python run.py <overrides>` would run, validated; UserError for a bad override."""
    cfg = compose_run_config(overrides)
    validate(cfg)
    return cfg


def read_images(paths):
    """[(path, bytes)]; UserError naming a file that cannot be read or is not an image PIL can open."""
    images = []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                data = handle.read()
            Image.open(path).verify()
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError("{}: not a readable image ({})".format(path, err))
        images.append((path, data))
    return images


def grid(views, samples):
    """uint8 [rows * samples, S, S, 3] views -> one uint8 image, a row per source image."""
    size = views.shape[1]
    rows = len(views) // samples
    canvas = np.full((rows * (size + GAP) - GAP, samples * (size + GAP) - GAP, 3), 255, np.uint8)
    for k, view in enumerate(views):
        row, col = divmod(k, samples)
        canvas[row * (size + GAP):row * (size + GAP) + size, col * (size + GAP):col * (size + GAP) + size] = view
    return canvas


def training_views(cfg, images, samples):
    """uint8 [len(images) * samples, S, S, 3]: `samples` training views of each image, and one line per mixed view
    (none without mixing)."""
    size = requested_image_size(cfg)
    with tf.Graph().as_default():
        data = tf.compat.v1.placeholder(tf.string, [])
        number = tf.compat.v1.placeholder(tf.int64, [])
        seed = tf.stack([tf.constant(cfg.seed, tf.int64), number])
        view = preprocess_image(data, size, True, cfg.dataset, seed=seed)
        with tf.compat.v1.Session() as sess:
            views = [sess.run(view, {data: image, number: k})
                     for k, image in enumerate(image for _, image in images for _ in range(samples))]
    views, lines = _mixed(cfg, np.stack(views))
    return np.clip(np.round(views), 0, 255).astype(np.uint8), lines


def _mixed(cfg, views):
    """The views as one training batch mixed by the run's train.mixup_alpha / cutmix_alpha (its draws of step 0),
    and a line saying how; unchanged and no line without mixing."""
    if not mixing.mixing_on(cfg.train):
        return views, []
    with tf.Graph().as_default():
        count = len(views)
        mixed = mixing.mix_batch(tf.constant(views), tf.range(count), count, cfg.train,
                                 mixing.mix_seed(cfg.seed, 0, 0))
        with tf.compat.v1.Session() as sess:
            images, lam, cut = sess.run([mixed.images, mixed.lam, mixed.use_cutmix])
    line = "mixed as training step 0 mixes its batch: view k with view {} - k, {} with lambda {:.3f}".format(
        count - 1, "CutMix" if cut else "MixUp", float(lam))
    return images, [line]


def op_views(cfg, images, op, magnitude):
    """Each image decoded whole, with op applied at level magnitude and a positive sign (uint8 arrays)."""
    constants = "autoaugment" if cfg.dataset.augment == AugmentPolicy.autoaugment else "randaugment"
    with tf.Graph().as_default():
        data = tf.compat.v1.placeholder(tf.string, [])
        number = tf.compat.v1.placeholder(tf.int64, [])
        decoded = tf.io.decode_image(data, channels=3, expand_animations=False)
        changed = augment.apply_op(decoded, op, magnitude, sign=1.0,
                                   seed=tf.stack([tf.constant(cfg.seed, tf.int64), number]), constants=constants)
        with tf.compat.v1.Session() as sess:
            return [sess.run(changed, {data: image, number: k}) for k, (_, image) in enumerate(images)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effnet_exp.tools.preview_augment",
                                     description="Training views of images, or one augmentation op applied.")
    parser.add_argument("items", nargs="+", metavar="IMAGE or key=value",
                        help="image files, and run.py overrides (dataset.augment=randaugment ...)")
    parser.add_argument("--out", required=True, help="grid mode: the PNG to write; --op mode: a folder")
    parser.add_argument("--samples", type=int, default=8, help="views per image (grid mode)")
    parser.add_argument("--op", default=None, help="apply this one op (AutoContrast, Rotate, ...) instead")
    parser.add_argument("--magnitude", type=float, default=10.0, help="the op's level (--op mode; 10 = max)")
    args = parser.parse_intermixed_args(argv)
    overrides = [item for item in args.items if "=" in item]
    paths = [item for item in args.items if "=" not in item]
    try:
        _check_args(args, paths)
        cfg = run_config(overrides)
        images = read_images(paths)
        if args.op:
            _write_ops(cfg, images, args)
        else:
            _write_grid(cfg, images, args)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    return 0


def _check_args(args, paths):
    if not paths:
        raise UserError("no IMAGE given")
    if args.samples < 1:
        raise UserError("--samples={} must be at least 1".format(args.samples))
    if args.op is not None and args.op not in augment.OPS:
        raise UserError("--op={} is not one of {}".format(args.op, ", ".join(augment.OPS)))
    if not 0.0 <= args.magnitude <= 30.0:
        raise UserError("--magnitude={} must be in [0, 30]".format(args.magnitude))


def _write_grid(cfg, images, args):
    views, lines = training_views(cfg, images, args.samples)
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UserError("--out={}: no folder {}".format(args.out, folder))
    Image.fromarray(grid(views, args.samples)).save(args.out, format="PNG")
    print("{}: {} images x {} training views at {}x{}, dataset.augment={}".format(
        args.out, len(images), args.samples, views.shape[1], views.shape[2], cfg.dataset.augment.value))
    for line in lines:
        print(line)


def _write_ops(cfg, images, args):
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError("--out={} is a file; --op mode writes one PNG per image into a folder".format(args.out))
    os.makedirs(args.out, exist_ok=True)
    for (path, _), view in zip(images, op_views(cfg, images, args.op, args.magnitude)):
        target = os.path.join(args.out, os.path.splitext(os.path.basename(path))[0] + ".png")
        Image.fromarray(view).save(target, format="PNG")
        print("{}: {} at level {} of {}".format(target, args.op, args.magnitude, path))


if __name__ == "__main__":
    sys.exit(main())
