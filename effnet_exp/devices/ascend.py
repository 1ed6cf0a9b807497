"""device=ascend through Huawei's npu_bridge (CANN's TensorFlow adapter, imported lazily by effnet_exp.optional).

One process per NPU (python -m effnet_exp.tools.launch_ascend): RANK_SIZE ranks train in sync, each reading its
own shard of the training files; gradients are averaged over the ranks by NPUDistributedOptimizer (HCCL
allreduce), rank 0's variables are broadcast after init or restore, and device.iterations_per_loop training steps
run on the NPU per sess.run (npu_bridge's IterationPerLoop).

The profiling, dump and precision-debugging switches (docs/ascend.md) are keys of the NpuOptimizer's
parameter_map, spelt and typed as the adapter's session parser reads them (tf_adapter/util/npu_attrs.cc).
Profiles and dumps go into this process's folder, for the sessions of the run's main work: the training
sessions when the run trains, the inference sessions when it evaluates, predicts or exports.
"""
import json
import logging
import os

import tensorflow as tf
from tensorflow.core.protobuf.rewriter_config_pb2 import RewriterConfig

from effnet_exp.devices.ascend_env import read_ascend_env
from effnet_exp.devices.base import Device, DeviceLoop, Purpose
from effnet_exp.devices.config import FLOAT16_PRECISION_MODES, DumpMode
from effnet_exp.devices.loss_scaling import LossScaling, new_overflow_counter
from effnet_exp.devices.placement import Placement
from effnet_exp.errors import UserError
from effnet_exp.modes import TRAINING_MODES
from effnet_exp.optional import import_npu_bridge, npu

log = logging.getLogger(__name__)


PROFILING_FOLDER, DUMP_FOLDER = "profiling", "dump"


class AscendDevice(Device):
    name = "ascend"
    # The sessions that get device.profiling and device.dump (check() sets it from the run's mode).
    debugged = Purpose.TRAIN

    def _placement(self):
        import_npu_bridge()  # the first thing device=ascend needs: one error line without it
        env = read_ascend_env(self.environ)
        return Placement(replicas=env.rank_size, processes=env.rank_size, rank=env.rank_id, chief=env.rank_id == 0,
                         input_shards=env.rank_size, input_shard=env.rank_id,
                         folder=None if env.rank_id == 0 else "rank_{}".format(env.rank_id))

    @property
    def steps_per_run(self):
        return self.cfg.iterations_per_loop

    def replica_source(self):
        return "RANK_SIZE={}".format(self.placement.processes)

    def describe(self):
        env = read_ascend_env(self.environ)
        return "device=ascend: NPU {} through npu_bridge (TensorFlow {}), rank {} of {}".format(
            env.device_id, tf.__version__, env.rank_id, env.rank_size)

    def check(self, run_cfg):
        super(AscendDevice, self).check(run_cfg)
        self.debugged = Purpose.TRAIN if run_cfg.mode in TRAINING_MODES else Purpose.INFERENCE
        loop = self.cfg.iterations_per_loop
        if loop == 1:
            return
        train = run_cfg.train
        for key, value in (("train.log_every", train.log_every), ("train.checkpoint_every", train.checkpoint_every),
                           ("train.eval_every", train.eval_every), ("train.steps", train.steps)):
            if value and value % loop:
                raise UserError("{}={} must be a multiple of device.iterations_per_loop={} (each sess.run "
                                "trains that many steps)".format(key, value, loop))

    def session_config(self, purpose):
        config = super(AscendDevice, self).session_config(purpose)
        custom_op = config.graph_options.rewrite_options.custom_optimizers.add()
        custom_op.name = "NpuOptimizer"
        params = custom_op.parameter_map
        cfg = self.cfg
        params["use_off_line"].b = cfg.use_off_line
        params["precision_mode"].s = tf.compat.as_bytes(cfg.precision_mode.value)
        params["mix_compile_mode"].b = cfg.mix_compile_mode
        if purpose == Purpose.TRAIN:
            params["iterations_per_loop"].i = cfg.iterations_per_loop
            if cfg.iterations_per_loop > 1:
                # The loop runs on the device and takes its batches from the in-graph iterator (GetNext sunk there).
                params["enable_data_pre_proc"].b = True
        if cfg.modify_mixlist:
            params["modify_mixlist"].s = tf.compat.as_bytes(cfg.modify_mixlist)
        if cfg.graph_memory_max_size:
            params["graph_memory_max_size"].s = tf.compat.as_bytes(str(cfg.graph_memory_max_size))
        if cfg.variable_memory_max_size:
            params["variable_memory_max_size"].s = tf.compat.as_bytes(str(cfg.variable_memory_max_size))
        if purpose == Purpose.TRAIN:
            params["hcom_parallel"].b = cfg.hcom_parallel
            if cfg.hccl_timeout is not None:
                params["hccl_timeout"].i = cfg.hccl_timeout
        _precision_debugging(params, cfg)
        if purpose == self.debugged:
            self._profiling(params)
            self._dump(params)
        rewrite = config.graph_options.rewrite_options
        rewrite.remapping = RewriterConfig.ON if cfg.remapping else RewriterConfig.OFF
        rewrite.memory_optimization = RewriterConfig.DEFAULT_MEM_OPT if cfg.memory_optimization else RewriterConfig.OFF
        return config

    def _profiling(self, params):
        profiling = self.cfg.profiling
        if not profiling.enabled:
            return
        switch = {True: "on", False: "off"}
        options = {"output": self._folder("device.profiling.output", profiling.output, PROFILING_FOLDER),
                   "training_trace": switch[profiling.training_trace], "task_trace": switch[profiling.task_trace],
                   "aicpu": switch[profiling.aicpu], "fp_point": profiling.fp_point, "bp_point": profiling.bp_point,
                   "aic_metrics": profiling.aic_metrics.value}
        params["profiling_mode"].b = True
        params["profiling_options"].s = tf.compat.as_bytes(json.dumps(options))

    def _dump(self, params):
        dump = self.cfg.dump
        if dump.mode == DumpMode.none:
            return
        params["dump_path"].s = tf.compat.as_bytes(self._folder("device.dump.output", dump.output, DUMP_FOLDER))
        if dump.mode == DumpMode.overflow:
            params["enable_dump_debug"].b = True
            params["dump_debug_mode"].s = tf.compat.as_bytes(dump.overflow.value)
            return
        params["enable_dump"].b = True
        params["dump_mode"].s = tf.compat.as_bytes(dump.data.value)
        if dump.steps is not None:
            params["dump_step"].s = tf.compat.as_bytes(str(dump.steps))

    def _folder(self, key, given, default):
        """The absolute folder of a profile or dump (created: the adapter wants an existing, writable one):
        `default` in this process's folder, a relative `given` in it too, an absolute one as given (a rank
        other than the chief: its rank_<k> sub-folder)."""
        own = self.output_folder or os.getcwd()
        if not given:
            path = os.path.join(own, default)
        elif os.path.isabs(given):
            path = os.path.join(given, self.placement.folder) if self.placement.folder else given
        else:
            path = os.path.join(own, given)
        path = os.path.abspath(path)
        try:
            if not os.path.isdir(path):
                os.makedirs(path)
        except OSError as err:
            raise UserError("{}={}: cannot create the folder {} ({})".format(key, given, path, err.strerror or err))
        log.info("%s: %s", key, path)
        return path

    def wrap_optimizer(self, optimizer):
        """NPUDistributedOptimizer (gradients averaged over the ranks) inside NPULossScaleOptimizer (float16
        precision modes), the order of Huawei's ModelZoo scripts."""
        distributed = self.placement.processes > 1
        if distributed:
            optimizer = npu("NPUDistributedOptimizer")(optimizer)
        cfg = self.cfg.loss_scale
        if self.cfg.precision_mode not in FLOAT16_PRECISION_MODES or cfg.scale == "none":
            return optimizer, None
        counter = new_overflow_counter()
        manager = _loss_scale_manager(cfg, counter)
        wrapped = npu("NPULossScaleOptimizer")(optimizer, manager, is_distributed=distributed)
        log.info("precision_mode %s: NPU loss scaling, %s scale", self.cfg.precision_mode.value, cfg.scale)
        return wrapped, LossScaling(wrapped, manager.get_loss_scale(), counter, count_own_overflows=False)

    def device_loop(self, train_op):
        if self.cfg.iterations_per_loop == 1:
            return DeviceLoop(train_op)
        return _NpuLoop(train_op, self.cfg.iterations_per_loop)

    def broadcast_op(self):
        if self.placement.processes == 1:
            return None
        return broadcast_variables_op(root_rank=0)


def _precision_debugging(params, cfg):
    """The switches that change how CANN compiles the graph: every session gets them, so that evaluation runs
    the graph that was trained."""
    if cfg.fusion_switch_file:
        params["fusion_switch_file"].s = tf.compat.as_bytes(cfg.fusion_switch_file)
    if cfg.op_debug_level:
        params["op_debug_level"].i = cfg.op_debug_level
    if cfg.op_select_implmode is not None:
        params["op_select_implmode"].s = tf.compat.as_bytes(cfg.op_select_implmode.value)
    if cfg.enable_exception_dump:
        params["enable_exception_dump"].i = 1


def _loss_scale_manager(cfg, counter):
    """npu_bridge's loss-scale manager, subclassed to also count the steps the optimizer reports as not finite:
    NPULossScaleOptimizer hands its overflow status (the NPU float status, all-reduced when distributed) to
    manager.update_loss_scale(is_overall_finite) on every step."""
    dynamic = cfg.scale == "dynamic"
    base = npu("ExponentialUpdateLossScaleManager" if dynamic else "FixedLossScaleManager")

    class CountingLossScaleManager(base):
        def update_loss_scale(self, finite_grads):
            return tf.group(super(CountingLossScaleManager, self).update_loss_scale(finite_grads),
                            counter.record(finite_grads))

    if dynamic:
        return CountingLossScaleManager(init_loss_scale=cfg.init_scale, incr_every_n_steps=cfg.incr_every_n_steps,
                                        decr_every_n_nan_or_inf=cfg.decr_every_n_nan_or_inf,
                                        incr_ratio=cfg.incr_ratio, decr_ratio=cfg.decr_ratio)
    return CountingLossScaleManager(loss_scale=float(cfg.scale), enable_overflow_check=True)


def broadcast_variables_op(root_rank=0):
    """Assigns every float global variable (weights, batch-norm statistics, optimizer slots, moving averages,
    the loss scale) and the global step the value they have on root_rank, with HCCL's broadcast."""
    hccl_ops = npu("hccl_ops")
    assigns = []
    with tf.name_scope("broadcast_from_rank_{}".format(root_rank)):
        for var in tf.compat.v1.global_variables():
            if not (var.dtype.base_dtype.is_floating or var.op.name == "global_step"):
                continue
            outputs = hccl_ops.broadcast(tensor=[var], root_rank=root_rank)
            if outputs:
                assigns.append(tf.compat.v1.assign(var, outputs[0]))
    return tf.group(*assigns, name="broadcast_variables")


class _NpuLoop(DeviceLoop):
    """Each sess.run of train_op runs `iterations` steps on the NPU (npu_bridge's IterationPerLoop: its loop
    variables are created with the graph and loaded once the session exists)."""

    def __init__(self, train_op, iterations):
        self.iterations = int(iterations)
        self.helper = npu("util").IterationPerLoop()
        super(_NpuLoop, self).__init__(self.helper.create_iteration_per_loop_var(train_op))

    def load(self, sess):
        self.helper.load_iteration_per_loop_var(sess, self.iterations)
