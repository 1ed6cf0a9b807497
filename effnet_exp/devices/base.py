"""The device object: everything that differs between the backends, behind one interface.

A run builds one device from `device=` (effnet_exp/devices/__init__.py:make_device). It owns the session config
per purpose, the optimizer wrappers (loss scaling, data-parallel gradient averaging), this process's Placement
(replicas, rank, chief, batch split, where it writes and resumes), the replication of the training step and the
device loop. Code outside devices/ asks the device; it never tests which backend it is.
"""
import enum

import tensorflow as tf

from effnet_exp.devices import distribute
from effnet_exp.devices.config import Strategy
from effnet_exp.devices.placement import SINGLE
from effnet_exp.errors import UserError
from effnet_exp.modes import TRAINING_MODES


class Purpose(enum.Enum):
    TRAIN = "train"
    INFERENCE = "inference"  # evaluation, prediction and export graphs: no device loop, one device


class DeviceLoop(object):
    """One training step per sess.run (the device loops of Ascend are in ascend.py)."""

    iterations = 1

    def __init__(self, train_op):
        self.train_op = train_op

    def load(self, sess):
        pass


class Device(object):
    """The common part, and what a backend without anything special does."""

    name = None

    def __init__(self, cfg, environ=None):
        self.cfg = cfg
        self.environ = environ
        self.placement = self._placement()
        self.output_folder = None  # see use_folder

    def use_folder(self, folder):
        """This process's folder (the run folder, or its rank / worker sub-folder): where device-side outputs
        such as Ascend profiles and dumps go by default."""
        self.output_folder = folder

    def _placement(self):
        if self.cfg.strategy == Strategy.none:
            return SINGLE
        return distribute.placement(self.cfg, self.environ)

    @property
    def steps_per_run(self):
        """Training steps per sess.run of the train op."""
        return 1

    @property
    def xla_swish_grad(self):
        return bool(self.cfg.xla_swish_grad)

    def check(self, run_cfg):
        """The rules that tie the device to the rest of the run config; UserError naming the keys."""
        if run_cfg.mode not in TRAINING_MODES:
            return  # evaluation, prediction and export run on one device
        strategy = self.cfg.strategy
        if strategy != Strategy.none and self.cfg.xla:
            raise UserError("device.strategy={} cannot be combined with device.xla=true (not supported yet: unset "
                            "it or use device.strategy=none)".format(strategy.value))
        batch, replicas = run_cfg.train.batch_size, self.placement.replicas
        if batch % replicas:
            raise UserError("train.batch_size={} is not divisible by the {} replicas ({}); train.batch_size is the "
                            "global batch, split evenly over the replicas".format(batch, replicas,
                                                                                  self.replica_source()))

    def describe(self):
        """Which physical devices this run uses, as the run log says once."""
        return "device={}: the CPU ({}){}".format(self.name, _tf_version(), self._replicas_text())

    def _replicas_text(self):
        replicas = self.placement.replicas
        return "; {} replicas ({})".format(replicas, self.replica_source()) if replicas > 1 else ""

    def replica_source(self):
        """Where the replica count comes from, for error messages."""
        if self.cfg.strategy == Strategy.mirrored:
            return "device.strategy=mirrored device.replicas={}".format(self.cfg.replicas)
        workers = self.placement.processes
        return "device.strategy=multi_worker: {} worker(s) in TF_CONFIG x {} replica(s) each".format(
            workers, self.placement.replicas // workers)

    def session_config(self, purpose):
        config = tf.compat.v1.ConfigProto(allow_soft_placement=True)
        config.intra_op_parallelism_threads = self.cfg.intra_op_threads
        config.inter_op_parallelism_threads = self.cfg.inter_op_threads
        if self.cfg.xla:
            config.graph_options.optimizer_options.global_jit_level = tf.compat.v1.OptimizerOptions.ON_1
        return config

    def wrap_optimizer(self, optimizer):
        """(optimizer to use, LossScaling or None)."""
        return optimizer, None

    def replicas(self):
        """The training graph's replication: tf.distribute under device.strategy, else a single device."""
        if self.cfg.strategy == Strategy.none:
            return distribute.SingleDevice()
        return distribute.Replicated(self.cfg, self.environ)

    def device_loop(self, train_op):
        return DeviceLoop(train_op)

    def broadcast_op(self):
        """An op giving every process the chief's variables after init or restore, or None."""
        return None


def _tf_version():
    return "TensorFlow {}".format(tf.__version__)
