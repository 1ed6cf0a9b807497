"""The loss and the accuracy metrics, one definition for training and evaluation."""
import tensorflow as tf


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0, per_image=False):
    """Softmax cross-entropy against one-hot labels: the batch mean, or one value per image."""
    reductions = tf.compat.v1.losses.Reduction
    reduction = reductions.NONE if per_image else reductions.SUM_BY_NONZERO_WEIGHTS
    return tf.compat.v1.losses.softmax_cross_entropy(tf.one_hot(labels, num_classes), logits,
                                                     label_smoothing=label_smoothing, reduction=reduction)


def top_k_hits(logits, labels, k):
    """A bool per image: its label is among the k largest logits (k capped at the class count)."""
    return tf.compat.v1.nn.in_top_k(predictions=tf.cast(logits, tf.float32), targets=labels,
                                    k=min(k, int(logits.shape[-1])))


def top_k_accuracy(logits, labels, k):
    return tf.reduce_mean(tf.cast(top_k_hits(logits, labels, k), tf.float32))
