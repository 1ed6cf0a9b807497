"""Where this process stands in a data-parallel job, under the one batch convention of every backend.

train.batch_size is the GLOBAL batch: split evenly over the `replicas` devices that train in sync (Ascend ranks,
one NPU per process, or tf.distribute replicas), so each device computes train.batch_size / replicas images per
step, an epoch is num_train / train.batch_size steps and learning-rate scaling uses the global batch. The data is
read as `input_shards` disjoint streams: an Ascend rank reads its own shard of the training files (batch
train.batch_size / replicas), while every tf.distribute worker reads the one global stream and each replica takes
its slice of every global batch. Only the chief writes the run folder's checkpoints and results; every other
process writes its own logs and metrics under <run folder>/<folder>/ and resumes from the run folder's
checkpoints, at the same step and stream position as the chief. No TensorFlow import here.
"""
from collections import namedtuple


class Placement(namedtuple("Placement", "replicas processes rank chief input_shards input_shard folder")):
    __slots__ = ()

    def device_batch(self, global_batch):
        return global_batch // self.replicas

    def stream_batch(self, global_batch):
        """The batch of this process's input stream."""
        return global_batch // self.input_shards

    def describe(self, global_batch):
        text = "global batch {} = {} per device x {} device(s)".format(
            global_batch, self.device_batch(global_batch), self.replicas)
        if self.processes > 1:
            text += "; process {} of {}{}".format(self.rank, self.processes, " (chief)" if self.chief else "")
        if self.input_shards > 1:
            text += "; reads input shard {} of {}, batch {}".format(
                self.input_shard, self.input_shards, self.stream_batch(global_batch))
        return text


SINGLE = Placement(replicas=1, processes=1, rank=0, chief=True, input_shards=1, input_shard=0, folder=None)
