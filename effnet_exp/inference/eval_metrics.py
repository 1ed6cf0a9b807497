"""An evaluation's metrics from its per-image arrays, in NumPy only: what eval.json holds is a function of what
predictions.jsonl holds, so it can be recomputed (and checked against scikit-learn).

Definitions (also in docs/training.md, "Evaluate and predict"):
- confusion[t, p]: the images of true class t whose top-1 class is p.
- per class: precision tp / (tp + fp), recall tp / support, f1 2 tp / (2 tp + fp + fn), top5_recall (the share of
  the class's images with their class among the top 5); 0 where a denominator is 0 (scikit-learn's
  zero_division=0).
- balanced_accuracy: the mean recall over the classes with images (scikit-learn's balanced_accuracy_score).
- macro_f1: the mean F1 over the classes that occur as a label or as a top-1 prediction, scikit-learn's
  f1_score(average="macro") with its default labels: a class neither in the eval set nor predicted does not
  count (it would only add a 0).
- nll: the mean of -log p(true class), p clipped below at NLL_FLOOR (a float32 softmax can round it to 0).
- ece: ECE_BINS equal-width bins of the top-1 confidence over [0, 1], bin b holding (b/15, (b+1)/15] (the first
  also 0): sum over bins of n_b / N x |accuracy_b - mean confidence_b|.
- top1_ci95: a percentile bootstrap: the top-1 of BOOTSTRAP_RESAMPLES resamples of the eval images with replacement
  (each drawn as its count of correct images, see top1_interval) by NumPy's RandomState(BOOTSTRAP_SEED) (a stream
  NumPy keeps the same across versions), then their 2.5th and 97.5th percentiles.
"""
from collections import namedtuple

import numpy as np

TOP_K = 5
ECE_BINS = 15
NLL_FLOOR = 1e-12
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0

EvalArrays = namedtuple("EvalArrays", "labels top_index top_probability label_probability")
EvalArrays.__doc__ = """Per-image results in eval order: labels [N] int, top_index [N, k] int (the k = min(5,
classes) most probable classes, most probable first), top_probability [N, k] float, label_probability [N] float
(the true class's probability)."""

ReliabilityBins = namedtuple("ReliabilityBins", "edges accuracy confidence count")
ReliabilityBins.__doc__ = """The calibration diagram: edges [bins + 1] over [0, 1]; per bin the top-1 accuracy,
the mean top-1 confidence (both 0 in an empty bin) and the image count."""


class EvalAccumulator(object):
    """EvalArrays of an evaluation, collected batch by batch (small per image: a label, k indices, k + 1
    probabilities; 50,000 images take about 2 MB)."""

    def __init__(self):
        self._batches = []

    def add(self, labels, top_index, top_probability, label_probability):
        self._batches.append(EvalArrays(np.asarray(labels, np.int32), np.asarray(top_index, np.int32),
                                        np.asarray(top_probability, np.float32),
                                        np.asarray(label_probability, np.float32)))

    @property
    def count(self):
        return sum(len(batch.labels) for batch in self._batches)

    def arrays(self):
        return EvalArrays(*(np.concatenate(parts) for parts in zip(*self._batches)))


def confusion_matrix(labels, predicted, num_classes):
    """Counts [num_classes, num_classes] int64, rows the true class, columns the predicted one."""
    flat = np.asarray(labels, np.int64) * num_classes + np.asarray(predicted, np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator, denominator):
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def per_class(confusion, top5_hits):
    """{support, precision, recall, f1, top5_recall}: one array per key, one value per class.

    top5_hits [C]: the images of each class with their class among the top 5."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    return {"support": support, "precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
            "f1": _ratio(2 * tp, support + predicted), "top5_recall": _ratio(top5_hits, support)}


def balanced_accuracy(confusion):
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present].astype(np.float64)))


def macro_f1(confusion):
    classes = per_class(confusion, np.zeros(len(confusion)))
    occurring = (confusion.sum(axis=1) > 0) | (confusion.sum(axis=0) > 0)
    return float(np.mean(classes["f1"][occurring]))


def negative_log_likelihood(label_probability):
    return float(np.mean(-np.log(np.clip(np.asarray(label_probability, np.float64), NLL_FLOOR, 1.0))))


def reliability_bins(confidence, correct, bins=ECE_BINS):
    """ReliabilityBins of top-1 confidences [N] and their correctness [N] (bool)."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = _ratio(np.bincount(which, weights=correct, minlength=bins), count)
    mean_confidence = _ratio(np.bincount(which, weights=confidence, minlength=bins), count)
    return ReliabilityBins(edges, accuracy, mean_confidence, count)


def expected_calibration_error(confidence, correct, bins=ECE_BINS):
    return calibration_error(reliability_bins(confidence, correct, bins))


def calibration_error(reliability):
    """ECE of ReliabilityBins."""
    weights = reliability.count / float(max(reliability.count.sum(), 1))
    return float(np.sum(weights * np.abs(reliability.accuracy - reliability.confidence)))


def top1_interval(correct, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED):
    """[low, high]: the percentile bootstrap 95% interval of the mean of correct [N] (bool).

    A resample of the N images with replacement holds Binomial(N, top-1) correct ones (each draw is independently
    correct with probability top-1): drawing that count is the same bootstrap as drawing the images, in O(1)
    memory and time instead of O(N) a resample (about 1 s for 1000 resamples of 50,000 images)."""
    correct = np.asarray(correct, bool)
    n = len(correct)
    rng = np.random.RandomState(seed)
    values = rng.binomial(n, np.count_nonzero(correct) / float(n), size=resamples) / float(n)
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]


def top5_hits(arrays):
    """A bool per image: its label among its top_index (the top min(5, classes))."""
    return np.any(arrays.top_index == arrays.labels[:, None], axis=1)


def evaluation_metrics(arrays, class_names):
    """(eval.json's metric fields, the confusion matrix) of EvalArrays; class_names: one per class."""
    num_classes = len(class_names)
    correct = arrays.top_index[:, 0] == arrays.labels
    in_top5 = top5_hits(arrays)
    confusion = confusion_matrix(arrays.labels, arrays.top_index[:, 0], num_classes)
    classes = per_class(confusion, np.bincount(arrays.labels[in_top5], minlength=num_classes))
    fields = {"top1": float(np.mean(correct)), "top5": float(np.mean(in_top5)),
              "balanced_accuracy": balanced_accuracy(confusion), "macro_f1": macro_f1(confusion),
              "nll": negative_log_likelihood(arrays.label_probability),
              "ece": expected_calibration_error(arrays.top_probability[:, 0], correct),
              "top1_ci95": top1_interval(correct), "per_class": _per_class_entries(classes, class_names)}
    return fields, confusion


def _per_class_entries(classes, class_names):
    return [{"index": index, "name": name, "support": int(classes["support"][index]),
             "precision": float(classes["precision"][index]), "recall": float(classes["recall"][index]),
             "f1": float(classes["f1"][index]), "top5_recall": float(classes["top5_recall"][index])}
            for index, name in enumerate(class_names)]
