"""The loss and the accuracy metrics, one definition for training and evaluation."""
import tensorflow as tf


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0, per_image=False):
    """Softmax cross-entropy against one-hot labels: the batch mean, or one value per image."""
    return soft_cross_entropy(logits, tf.one_hot(labels, num_classes), label_smoothing, per_image=per_image)


def soft_cross_entropy(logits, targets, label_smoothing=0.0, class_weights=None, per_image=False):
    """Softmax cross-entropy against soft targets [B, C] (rows summing to 1), smoothed as the one-hot targets would
    be: targets x (1 - label_smoothing) + label_smoothing / C (affine, so smoothing then mixing one-hot targets is
    the same as this). class_weights [C]: each image's loss times sum_k targets_k x w_k (the unsmoothed targets),
    and the batch value is sum_i w_i l_i / B, the Keras convention (not divided by the sum of the weights)."""
    num_classes = int(targets.shape[-1])
    smoothed = targets * (1.0 - label_smoothing) + label_smoothing / num_classes if label_smoothing else targets
    losses = tf.compat.v1.nn.softmax_cross_entropy_with_logits_v2(labels=tf.stop_gradient(smoothed),
                                                                   logits=tf.cast(logits, tf.float32))
    if class_weights is not None:
        losses = losses * tf.reduce_sum(targets * class_weights, axis=1)
    return losses if per_image else tf.reduce_mean(losses)


def top_k_hits(logits, labels, k):
    """A bool per image: its label is among the k largest logits (k capped at the class count)."""
    return tf.compat.v1.nn.in_top_k(predictions=tf.cast(logits, tf.float32), targets=labels,
                                    k=min(k, int(logits.shape[-1])))


def top_k_accuracy(logits, labels, k):
    return tf.reduce_mean(tf.cast(top_k_hits(logits, labels, k), tf.float32))
