"""train.class_weights resolved against the data: one loss weight per class, or None (unweighted)."""
import logging

import numpy as np

from effnet_exp.data.source import train_class_counts
from effnet_exp.errors import UserError
from effnet_exp.training.config import BALANCED, class_weights_setting

log = logging.getLogger(__name__)


def resolve_class_weights(train_cfg, source, ds_cfg, num_classes, class_names=None):
    """The weights of train.class_weights for num_classes classes (logged once), or None; UserError for a list of
    another length, or a class without training images under balanced."""
    setting = class_weights_setting(train_cfg.class_weights)
    if setting is None:
        return None
    if setting != BALANCED:
        if len(setting) != num_classes:
            raise UserError("train.class_weights={} has {} weights but the model has {} classes".format(
                train_cfg.class_weights, len(setting), num_classes))
        log.info("class weights (train.class_weights): %s", _numbers(setting))
        return setting
    counts, origin = train_class_counts(source, ds_cfg, num_classes)
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty:
        raise UserError("train.class_weights=balanced: class {} has no training images ({} class(es) without any); "
                        "give the weights as a list instead".format(_class_text(empty[0], class_names), len(empty)))
    weights = balanced_weights(counts)
    log.info("class weights (train.class_weights=balanced, N / (C x n_c) from %s): %s; training images per class: %s",
             origin, _numbers(weights), counts)
    return weights


def balanced_weights(counts):
    """scikit-learn's "balanced": n_samples / (n_classes x count of each class)."""
    counts = np.asarray(counts, np.float64)
    return (counts.sum() / (len(counts) * counts)).tolist()


def _class_text(index, names):
    return "{} ({!r})".format(index, names[index]) if names else str(index)


def _numbers(values):
    return "[" + ", ".join("%.4g" % v for v in values) + "]"
