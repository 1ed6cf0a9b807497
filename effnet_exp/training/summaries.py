"""TensorBoard scalars written from Python values: no summary ops in the graph, no extra sess.run."""
import tensorflow as tf


def write_scalars(writer, step, values):
    summary = tf.compat.v1.Summary(
        value=[tf.compat.v1.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in sorted(values.items())])
    writer.add_summary(summary, step)
    writer.flush()


class NoSummaries(object):
    """The summary writer of a process other than the chief."""

    def add_summary(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass
