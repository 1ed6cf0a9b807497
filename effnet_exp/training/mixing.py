"""MixUp and CutMix of the training batch (train.mixup_alpha, train.cutmix_alpha, train.mix_switch_prob).

Each replica (tf.distribute replica or Ascend rank) mixes the batch it trains on: image i with image n-1-i of that
batch (the batch reversed, as timm does; with an odd n the middle image is its own partner), by one
lambda ~ Beta(alpha, alpha) per batch and step. Every random number of a step comes from one stateless draw seeded
by (run seed, global step, replica), so a resumed run mixes its batches exactly as an uninterrupted one, and no two
replicas share a draw.

Beta(a, a) is X / (X + Y) with X, Y ~ Gamma(a, 1). TF 1.15 has no stateless gamma sampler, so Gamma(a) is written
out on stateless uniforms: Marsaglia and Tsang's method for Gamma(a + 1) (normals by Box-Muller) times U^(1/a),
their boost, valid for every a > 0, all in log space so that a small alpha does not underflow. The method is exact;
of its _ATTEMPTS candidates the first accepted one is taken, and each is accepted with probability above 0.95, so
that all are rejected (the sample is then the Gamma(a + 1) candidate's centre) with probability below 1e-20.
"""
import math
from collections import namedtuple

import tensorflow as tf

_ATTEMPTS = 16
# The first seed component is the run seed xor this, so that no mixing draw shares a seed with the input pipeline's
# stateless draws ((seed, epoch), (seed, image number)); the second is step x _MAX_REPLICAS + replica.
_SALT = 0x6D69786D6978
_MAX_REPLICAS = 1 << 16
_DRAWS = 2 * (3 * _ATTEMPTS + 1) + 3  # two gamma samples, the MixUp / CutMix switch, the box centre

Mixed = namedtuple("Mixed", "images targets labels lam box use_cutmix")
Mixed.__doc__ = """A mixed batch: images; targets [B, C], lam x one-hot(label) + (1 - lam) x one-hot(partner's);
labels, the dominant label of each image (its own when lam >= 0.5, else its partner's); lam, the real share of
each image's own pixels (CutMix: corrected to the clipped box); box [y0, y1, x0, x1] of the pasted region (CutMix);
use_cutmix, whether this batch was cut (else blended)."""


def mixing_on(train_cfg):
    return train_cfg.mixup_alpha > 0 or train_cfg.cutmix_alpha > 0


def describe(train_cfg):
    """One line on the mixing a run does, or None."""
    parts = []
    if train_cfg.mixup_alpha > 0:
        parts.append("MixUp with lambda ~ Beta({0:g}, {0:g})".format(train_cfg.mixup_alpha))
    if train_cfg.cutmix_alpha > 0:
        parts.append("CutMix with lambda ~ Beta({0:g}, {0:g})".format(train_cfg.cutmix_alpha))
    if not parts:
        return None
    both = " (CutMix for a batch with probability {:g})".format(train_cfg.mix_switch_prob) if len(parts) == 2 else ""
    return "mixing each replica's batch with itself reversed: {}{}".format(" or ".join(parts), both)


def training_batch(images, labels, num_classes, train_cfg, run_seed, global_step, placement):
    """(images, soft targets [B, C], labels for the train top-1) of a replica's batch: mixed when train.mixup_alpha
    or train.cutmix_alpha is above 0, else as they are with one-hot targets."""
    if not mixing_on(train_cfg):
        return images, tf.one_hot(labels, num_classes), labels
    seed = mix_seed(run_seed, global_step, replica_index(placement))
    mixed = mix_batch(images, labels, num_classes, train_cfg, seed)
    return mixed.images, mixed.targets, mixed.labels


def replica_index(placement):
    """This replica's index among all that train in sync: the process's rank x its replicas + the local replica.
    (tf.distribute's replica_id_in_sync_group counts over the workers on TF 2.x but within the worker on TF 1.15:
    taken modulo the local count, it is the local replica on both; outside a strategy it is 0.)"""
    local = placement.replicas // placement.processes
    in_sync = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.int64)
    return placement.rank * local + tf.math.floormod(in_sync, local)


def mix_seed(run_seed, global_step, replica):
    """The stateless seed of one replica's mixing at one step."""
    step = tf.cast(global_step, tf.int64)
    return tf.stack([tf.constant(int(run_seed) ^ _SALT, tf.int64), step * _MAX_REPLICAS + replica])


def mix_batch(images, labels, num_classes, train_cfg, seed):
    """Mixed (see its doc) of images [B, H, W, C] and labels [B], with the draws of the stateless seed."""
    draws = _Draws(seed)
    use_cutmix = _use_cutmix(train_cfg, draws)
    alpha = tf.compat.v1.where(use_cutmix, tf.constant(train_cfg.cutmix_alpha, tf.float64),
                               tf.constant(train_cfg.mixup_alpha, tf.float64))
    lam = beta_sample(alpha, draws)
    height, width = int(images.shape[1]), int(images.shape[2])
    box, box_lam = cutmix_box(lam, height, width, draws.take(1)[0], draws.take(1)[0])
    lam = tf.cast(tf.compat.v1.where(use_cutmix, box_lam, lam), tf.float32)
    # tf.reverse, not [::-1]: a strided slice with a negative stride is 20-80 times slower on a CPU.
    partners, partner_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
    mixed = tf.cond(use_cutmix, lambda: _paste(images, partners, box), lambda: lam * images + (1.0 - lam) * partners)
    one_hot = tf.one_hot(labels, num_classes)
    return Mixed(images=mixed, targets=lam * one_hot + (1.0 - lam) * tf.one_hot(partner_labels, num_classes),
                 labels=tf.compat.v1.where(lam >= 0.5, labels, partner_labels), lam=lam, box=box,
                 use_cutmix=use_cutmix)


def _use_cutmix(train_cfg, draws):
    switch = draws.take(1)[0]  # drawn whatever the config, so that the draws after it do not move
    if train_cfg.mixup_alpha > 0 and train_cfg.cutmix_alpha > 0:
        return switch <= train_cfg.mix_switch_prob  # switch is in (0, 1]: probability 0 never cuts, 1 always
    return tf.constant(train_cfg.cutmix_alpha > 0)


def beta_sample(alpha, draws):
    """One lambda ~ Beta(alpha, alpha) (float64), as X / (X + Y) = sigmoid(log X - log Y)."""
    return tf.sigmoid(_log_gamma(alpha, draws) - _log_gamma(alpha, draws))


def _log_gamma(alpha, draws):
    """log of one Gamma(alpha, 1) sample: Marsaglia-Tsang for Gamma(alpha + 1), boosted by U^(1/alpha)."""
    d = alpha + 1.0 - 1.0 / 3.0
    c = 1.0 / tf.sqrt(9.0 * d)
    radius, angle, accept = draws.take(_ATTEMPTS), draws.take(_ATTEMPTS), draws.take(_ATTEMPTS)
    x = tf.sqrt(-2.0 * tf.math.log(radius)) * tf.cos(2.0 * math.pi * angle)
    v = (1.0 + c * x) ** 3
    log_v = tf.math.log(tf.maximum(v, 1e-300))
    accepted = tf.logical_and(v > 0, tf.math.log(accept) < 0.5 * x * x + d - d * v + d * log_v)
    first = tf.argmax(tf.cast(accepted, tf.int32))  # the first accepted candidate (0 when none is)
    log_v = tf.compat.v1.where(tf.reduce_any(accepted), log_v[first], tf.constant(0.0, tf.float64))
    return tf.math.log(d) + log_v + tf.math.log(draws.take(1)[0]) / alpha


def cutmix_box(lam, height, width, center_y, center_x):
    """timm's rand_bbox: ([y0, y1, x0, x1], 1 - box area / image area) of a box of about (1 - lam) of the image,
    side x sqrt(1 - lam), centred at (center_y, center_x) (fractions of the size, in (0, 1]), clipped to the image."""
    ratio = tf.sqrt(1.0 - lam)

    def span(size, center):
        half = tf.cast(tf.floor(size * ratio), tf.int32) // 2
        middle = tf.minimum(tf.cast(tf.floor(center * size), tf.int32), size - 1)
        return tf.clip_by_value(middle - half, 0, size), tf.clip_by_value(middle + half, 0, size)

    y0, y1 = span(height, center_y)
    x0, x1 = span(width, center_x)
    area = tf.cast((y1 - y0) * (x1 - x0), tf.float64)
    return tf.stack([y0, y1, x0, x1]), 1.0 - area / float(height * width)


def _paste(images, partners, box):
    """images with the box of partners pasted in."""
    height, width = int(images.shape[1]), int(images.shape[2])
    rows, cols = tf.range(height), tf.range(width)
    inside_rows = tf.logical_and(rows >= box[0], rows < box[1])
    inside_cols = tf.logical_and(cols >= box[2], cols < box[3])
    inside = tf.reshape(tf.logical_and(inside_rows[:, None], inside_cols[None, :]), [1, height, width, 1])
    # Broadcast first: Select of same-shape operands is several times faster than broadcasting inside the op.
    return tf.compat.v1.where(tf.broadcast_to(inside, tf.shape(images)), partners, images)


class _Draws(object):
    """The step's stateless uniforms in (0, 1], handed out in a fixed order."""

    def __init__(self, seed):
        self.values = 1.0 - tf.random.stateless_uniform([_DRAWS], seed=seed, dtype=tf.float64)
        self.used = 0

    def take(self, count):
        assert self.used + count <= _DRAWS, "raise _DRAWS"
        taken = self.values[self.used:self.used + count]
        self.used += count
        return taken
