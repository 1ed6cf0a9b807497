"""Data parallelism on GPUs and CPUs with tf.distribute, in tf.compat.v1 graph style (TF 1.15 and TF 2.x).

- device.strategy=mirrored device.replicas=N: tf.compat.v1.distribute.MirroredStrategy over N devices of this
  host: GPUs (device.replicas=0: every visible one), or on device=cpu N logical CPU devices of the training
  session (ConfigProto device_count={"CPU": N}; they share the host's cores).
- device.strategy=multi_worker: tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy over the
  chief/worker tasks that TF_CONFIG lists, each running the same command; each process starts a
  tf.distribute.Server for its task and runs its training session against it (collective all-reduce over
  gRPC). The chief (chief:0, else worker:0) writes the run folder; every other worker only its own
  <run folder>/worker_<id>/ (run.log, metrics.jsonl, curves.png) and reads the chief's checkpoints to resume, so
  the run folder must be on a file system all workers see under the same path.

What is replicated is training/step.py's replica step: forward pass, loss and the optimizer update, once per
replica. train.batch_size is the GLOBAL batch (devices/placement.py): every worker reads the same input stream as a single-device run
(same records, crops and flips; a resume starts after step * global batch records) and each replica takes its
contiguous slice of every global batch, so the replicas of one step see exactly the single-device batch. Each
replica's loss is divided by the replica count and the v1 optimizer sums the gradients over the replicas in
apply_gradients (an all-reduce), which gives the gradient of the global-batch mean. Batch-norm statistics are per
replica in the forward pass; the moving averages are updated with the mean over the replicas
(tf.VariableAggregation.MEAN in model/layers.py). Saver and checkpoints see the mirrored variables under their
usual names. Each worker decodes its whole global batch before taking its slice (like tf.data's
AutoShardPolicy.DATA): exact, but the input pipeline does W times the work on W workers.

"""
import contextlib
import json
import logging
import os
from collections import namedtuple

import tensorflow as tf

from effnet_exp.devices.config import Strategy
from effnet_exp.devices.placement import Placement
from effnet_exp.errors import UserError

log = logging.getLogger(__name__)

TF_CONFIG_EXAMPLE = ('TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}\'')

# This process's task in TF_CONFIG: id is its place in chief + workers (chief first), count their number.
WorkerTask = namedtuple("WorkerTask", ["type", "index", "id", "count", "chief", "cluster"])


def read_tf_config(environ=None):
    """This process's WorkerTask from the environment variable TF_CONFIG; UserError naming what is wrong."""
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text:
        raise UserError("device.strategy=multi_worker needs the environment variable TF_CONFIG in every worker, "
                        "e.g. " + TF_CONFIG_EXAMPLE)
    try:
        config = json.loads(text)
    except ValueError as err:
        raise UserError("environment variable TF_CONFIG is not JSON ({}): {!r}".format(err, text))
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise UserError("environment variable TF_CONFIG needs \"cluster\" and \"task\" objects, e.g. "
                        + TF_CONFIG_EXAMPLE)
    other = sorted(set(cluster) - {"chief", "worker"})
    if other:
        raise UserError("environment variable TF_CONFIG: device.strategy=multi_worker takes only chief and worker "
                        "tasks, not {}".format(", ".join(other)))
    chiefs, workers = list(cluster.get("chief") or []), list(cluster.get("worker") or [])
    if len(chiefs) > 1:
        raise UserError("environment variable TF_CONFIG lists {} chief tasks; at most one".format(len(chiefs)))
    task_type, index = task.get("type"), task.get("index", 0)
    tasks = {"chief": chiefs, "worker": workers}
    if task_type not in tasks or not isinstance(index, int) or not 0 <= index < len(tasks[task_type]):
        raise UserError("environment variable TF_CONFIG: task {} is not in its cluster (chief: {}, worker: {} "
                        "task(s))".format(json.dumps(task), len(chiefs), len(workers)))
    task_id = index + (len(chiefs) if task_type == "worker" else 0)
    return WorkerTask(task_type, index, task_id, len(chiefs) + len(workers), task_id == 0,
                      {"chief": chiefs, "worker": workers} if chiefs else {"worker": workers})


def _visible_gpus(device_cfg):
    if device_cfg.name == "gpu" and device_cfg.visible_devices not in (None, ""):
        return len([d for d in str(device_cfg.visible_devices).split(",") if d.strip()])
    return len(tf.config.experimental.list_physical_devices("GPU"))


def replica_count(device_cfg, environ=None):
    """Replicas in sync under device.strategy (1 without one); UserError when it cannot be had here."""
    if device_cfg.strategy == Strategy.none:
        return 1
    if device_cfg.strategy == Strategy.mirrored:
        if device_cfg.replicas > 0:
            if device_cfg.name == "gpu" and device_cfg.replicas > _visible_gpus(device_cfg):
                raise UserError("device.replicas={} but only {} GPU(s) are visible".format(
                    device_cfg.replicas, _visible_gpus(device_cfg)))
            return device_cfg.replicas
        if device_cfg.name == "cpu":
            raise UserError("device=cpu device.strategy=mirrored needs device.replicas=N >= 1 (N logical CPU "
                            "devices)")
        gpus = _visible_gpus(device_cfg)
        if not gpus:
            raise UserError("device=gpu device.strategy=mirrored device.replicas=0 (every GPU): no GPU is visible")
        return gpus
    task = read_tf_config(environ)
    # MultiWorkerMirroredStrategy replicates over every GPU of each worker (the same count on all), or its CPU.
    per_worker = _visible_gpus(device_cfg) if device_cfg.name == "gpu" else 1
    return task.count * max(per_worker, 1)


class SingleDevice(object):
    """The training graph without a strategy: one iterator, one step, one local session."""

    count = 1

    def scope(self):
        return contextlib.nullcontext()

    def input_iterator(self, dataset_fn, global_batch):
        """(initializer op, (images, labels)) of dataset_fn()'s batches."""
        iterator = tf.compat.v1.data.make_initializable_iterator(dataset_fn())
        return iterator.initializer, iterator.get_next()

    def run(self, step_fn, inputs, *shared):
        return step_fn(*(tuple(inputs) + shared))

    def session(self, graph, config):
        return tf.compat.v1.Session(graph=graph, config=config)

    def apply_if_finite(self, optimizer, grads_and_vars, finite, global_step):
        """The update only when `finite`; the step counts either way."""
        def apply():
            return optimizer.apply_gradients(grads_and_vars, global_step=global_step)

        def skip():
            return tf.group(tf.compat.v1.assign_add(global_step, 1))

        return tf.cond(finite, apply, skip)

    def describe(self):
        return None

    def watch_copies(self):
        pass

    def report_copies(self, sess, step):
        pass


@contextlib.contextmanager
def _quiet_tensorflow_info():
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


_SERVERS = {}  # one tf.distribute.Server per task and process (it cannot be stopped, its port stays bound)


class Replicated(object):
    """A tf.distribute strategy around the training graph (build everything inside scope())."""

    def __init__(self, device_cfg, environ=None):
        self.name = device_cfg.strategy.value
        self.device_cfg = device_cfg
        self.task = None
        self.cpu_devices = 0
        if device_cfg.strategy == Strategy.mirrored:
            count = replica_count(device_cfg, environ)
            kind = "gpu" if device_cfg.name == "gpu" else "cpu"
            self.cpu_devices = count if kind == "cpu" else 0
            self.strategy = tf.compat.v1.distribute.MirroredStrategy(["/{}:{}".format(kind, i) for i in range(count)])
        else:
            self.task = read_tf_config(environ)
            # Reads TF_CONFIG itself; in graph mode it starts no server (session() does).
            self.strategy = tf.compat.v1.distribute.experimental.MultiWorkerMirroredStrategy()
        self.count = self.strategy.num_replicas_in_sync
        self.local_devices = list(self.strategy.extended.worker_devices)
        self._copies = None

    def scope(self):
        return self.strategy.scope()

    def input_iterator(self, dataset_fn, global_batch):
        """(initializer op, per-replica (images, labels)): every worker reads dataset_fn()'s global batches and each
        replica takes its contiguous slice of each (global replica r: images [r * b, (r + 1) * b))."""
        per_replica = global_batch // self.count

        def input_fn(context):
            local = context.num_replicas_in_sync // context.num_input_pipelines
            first = context.input_pipeline_id * local * per_replica

            def this_workers_replicas(images, labels):
                def split(t):
                    t = t[first:first + local * per_replica]
                    return tf.reshape(t, [local, per_replica] + t.shape.as_list()[1:])

                return tf.data.Dataset.from_tensor_slices((split(images), split(labels)))

            # The local replicas take consecutive elements: local replica j gets global replica id * local + j.
            return dataset_fn().flat_map(this_workers_replicas)

        iterator = self.strategy.make_input_fn_iterator(input_fn)
        init = iterator.initialize()  # an op (TF 1.15) or a list of ops (TF 2.x)
        return tf.group(*init) if isinstance(init, (list, tuple)) else init, iterator.get_next()

    def run(self, step_fn, inputs, *shared):
        """step_fn(images, labels, *shared) on every replica (shared values, e.g. the global step, are captured,
        not split); returns build_step's dict for the whole step: the grouped update and replica means."""

        def replica_fn(*per_replica):
            return step_fn(*(tuple(per_replica) + shared))

        # TF 1.15 calls it experimental_run_v2, TF 2.x run.
        run = self.strategy.run if hasattr(self.strategy, "run") else self.strategy.experimental_run_v2

        def mean(value):
            return self.strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)

        with _quiet_tensorflow_info():  # "Reduce to ... then broadcast to ..." for each all-reduce
            outputs = run(replica_fn, args=tuple(inputs))
            merged = {"train_op": self.strategy.group(outputs["train_op"]), "loss": mean(outputs["loss"]),
                      "top1": mean(outputs["top1"]), "lr": mean(outputs["lr"]),
                      "extra": {k: mean(v) for k, v in outputs.get("extra", {}).items()}}
        return merged

    def describe(self):
        if self.task is None:
            where = "{} replicas on {}".format(self.count, ", ".join(self.local_devices))
        else:
            where = "{} replicas in all, this is {}:{} (worker {} of {}{}) with {}".format(
                self.count, self.task.type, self.task.index, self.task.id, self.task.count,
                ", the chief" if self.task.chief else "", ", ".join(self.local_devices))
        return "tf.distribute {}: {}; gradients summed over the replicas (each loss / {}), batch-norm statistics " \
               "per replica".format(self.name, where, self.count)

    def watch_copies(self):
        """Builds the check of report_copies over every variable there is now (call once the graph is complete)."""
        self._copies = self._copies_op()

    def _copies_op(self):
        """(largest |difference| between a variable's local copies, float64 checksum of the first copies)."""

        diffs, sums, self._copied = [], [], 0
        with tf.name_scope("replica_copies"):
            for var in tf.compat.v1.global_variables():
                if not var.dtype.base_dtype.is_floating:
                    continue
                copies = [tf.convert_to_tensor(c) for c in self.strategy.experimental_local_results(var)]
                sums.append(tf.reduce_sum(tf.cast(copies[0], tf.float64)))
                for other in copies[1:]:
                    diffs.append(tf.reduce_max(tf.abs(other - copies[0])))
                self._copied += 1
            spread = tf.reduce_max(tf.stack(diffs)) if diffs else tf.constant(0.0)
            return spread, tf.add_n(sums) if sums else tf.constant(0.0, tf.float64)

    def session(self, graph, config):
        config_copy = tf.compat.v1.ConfigProto()
        config_copy.CopyFrom(config)
        if self.cpu_devices:
            config_copy.device_count["CPU"] = self.cpu_devices  # the logical CPU devices of the replicas
        config_copy = self.strategy.update_config_proto(config_copy)
        target = ""
        if self.task is not None:
            key = (json.dumps(self.task.cluster, sort_keys=True), self.task.type, self.task.index)
            if key not in _SERVERS:
                _SERVERS[key] = tf.distribute.Server(tf.train.ClusterSpec(self.task.cluster), job_name=self.task.type,
                                                     task_index=self.task.index, config=config_copy, start=True)
            target = _SERVERS[key].target
        return tf.compat.v1.Session(target=target, graph=graph, config=config_copy)

    def report_copies(self, sess, step):
        """Logs whether the local copies of every variable are still identical, and a checksum of the weights
        (the same on every worker when the workers agree)."""
        spread, checksum = sess.run(self._copies)
        log.log(logging.INFO if spread == 0 else logging.WARNING,
                "step %d: the copies of %d variables on this process's %d device(s) %s (largest |difference| %g); "
                "weights checksum %.10g", step, self._copied, len(self.local_devices),
                "agree" if spread == 0 else "DIFFER", spread, checksum)

    def apply_if_finite(self, optimizer, grads_and_vars, finite, global_step):
        """train.nonfinite_policy=skip under a strategy, called in the replica context: the replicas' update only
        when every replica's loss and gradients are finite, else none at all (the step counts either way). The
        condition cannot sit inside a replica (apply_gradients all-reduces, and a replica that skipped it would
        leave the others waiting), so it is taken once, in the cross-replica context, around the replicas'
        apply_gradients."""
        def merge(strategy, all_finite, grads_and_vars):
            def apply():
                updates = strategy.extended.call_for_each_replica(
                    optimizer.apply_gradients, args=(grads_and_vars,), kwargs={"global_step": global_step})
                with tf.control_dependencies(strategy.experimental_local_results(updates)):
                    return tf.constant(True)

            def skip():
                with tf.control_dependencies([global_step.assign_add(1, read_value=False)]):
                    return tf.constant(False)

            # The same value on every replica: take the first's.
            return tf.cond(strategy.experimental_local_results(all_finite)[0], apply, skip)

        applied = tf.distribute.get_replica_context().merge_call(merge, args=(all_replicas_finite(finite),
                                                                              grads_and_vars))
        return tf.group(applied, name="apply_if_all_finite")


def all_replicas_finite(finite):
    """In the replica context: True on every replica when `finite` is True on all replicas of all workers (their
    "not finite" flags summed by one all-reduce); `finite` itself without a strategy."""
    if not tf.distribute.has_strategy():
        return finite

    def merge(strategy, nonfinite):
        return strategy.extended.reduce_to(tf.distribute.ReduceOp.SUM, nonfinite, destinations=nonfinite)

    nonfinite = 1.0 - tf.cast(finite, tf.float32)
    return tf.equal(tf.distribute.get_replica_context().merge_call(merge, args=(nonfinite,)), 0.0)


def placement(device_cfg, environ=None):
    """This process's Placement under device.strategy: every worker reads the global stream (one input shard)."""
    count = replica_count(device_cfg, environ)
    if device_cfg.strategy == Strategy.mirrored:
        return Placement(replicas=count, processes=1, rank=0, chief=True, input_shards=1, input_shard=0,
                         folder=None)
    task = read_tf_config(environ)
    return Placement(replicas=count, processes=task.count, rank=task.id, chief=task.chief, input_shards=1,
                     input_shard=0, folder=None if task.chief else "worker_{}".format(task.id))
