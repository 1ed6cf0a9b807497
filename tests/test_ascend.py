"""Ascend data parallelism and loss scaling, without an NPU.

npu_bridge (Huawei's CANN TensorFlow adapter) cannot run here. The tests that need it use a FAKE npu_bridge
package, written below (FAKE_NPU_BRIDGE) into a temporary folder: it has the names and call signatures of the
adapter's parts that effnet-exp uses (NPUDistributedOptimizer, NPULossScaleOptimizer, the two loss-scale
managers, hccl_ops.broadcast, util.IterationPerLoop), implemented with plain TensorFlow on the CPU, and it records
how it was called. Those tests check OUR wiring (which wrapper goes where, with which arguments, what is counted,
broadcast and written), never the adapter itself. The environment parsing and the launcher need no fake.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO, TINY, run_py
from effnet_exp.devices.ascend import broadcast_variables_op
from effnet_exp.devices.ascend_env import AscendEnv, read_ascend_env
from effnet_exp.devices.config import AscendDeviceConfig, CpuDeviceConfig, LossScaleConfig, PrecisionMode
from effnet_exp.devices.factory import make_device
from effnet_exp.devices.placement import SINGLE, Placement
from effnet_exp.errors import UserError
from effnet_exp.training.regularization import WeightsAverage
from effnet_exp.training.trainer import NonFiniteLoss, NonFiniteWatch
from factory import section

FAKE_NPU_BRIDGE = '''
"""FAKE npu_bridge.npu_init for effnet-exp's tests -- NOT Huawei's adapter. Same names and signatures as the parts
effnet-exp uses, plain TensorFlow on the CPU; every call is appended to CALLS (and to $FAKE_NPU_LOG as JSON)."""
import json
import os
import signal

import tensorflow as tf

CALLS = []


def _record(name, **details):
    CALLS.append((name, details))
    path = os.environ.get("FAKE_NPU_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"call": name, "details": details}) + "\\n")


class FixedLossScaleManager(object):
    def __init__(self, loss_scale, enable_overflow_check=True):
        _record("FixedLossScaleManager", loss_scale=loss_scale, enable_overflow_check=enable_overflow_check)
        self._loss_scale = tf.constant(float(loss_scale))

    def get_loss_scale(self):
        return self._loss_scale

    def update_loss_scale(self, finite_grads):
        return tf.no_op()


class ExponentialUpdateLossScaleManager(object):
    def __init__(self, init_loss_scale, incr_every_n_steps, decr_every_n_nan_or_inf=2, incr_ratio=2,
                 decr_ratio=0.8):
        _record("ExponentialUpdateLossScaleManager", init_loss_scale=init_loss_scale,
                incr_every_n_steps=incr_every_n_steps, decr_every_n_nan_or_inf=decr_every_n_nan_or_inf,
                incr_ratio=incr_ratio, decr_ratio=decr_ratio)
        self._decr_ratio = decr_ratio
        self._loss_scale = tf.compat.v1.get_variable("fake_loss_scale", initializer=float(init_loss_scale),
                                                     trainable=False)

    def get_loss_scale(self):
        return self._loss_scale

    def update_loss_scale(self, finite_grads):  # simplified: lowered at every overflow, never raised
        return tf.compat.v1.assign(self._loss_scale, tf.where(finite_grads, self._loss_scale,
                                                              self._loss_scale * self._decr_ratio)).op


class _Wrapper(tf.compat.v1.train.Optimizer):
    def __init__(self, opt, name):
        super(_Wrapper, self).__init__(False, name)
        self._opt = opt

    def get_slot(self, *args, **kwargs):
        return self._opt.get_slot(*args, **kwargs)

    def get_slot_names(self, *args, **kwargs):
        return self._opt.get_slot_names(*args, **kwargs)

    def variables(self):
        return self._opt.variables()


class NPUDistributedOptimizer(_Wrapper):
    def __init__(self, optimizer, is_weight_update_sharding=False, name=None):
        _record("NPUDistributedOptimizer", inner=type(optimizer).__name__)
        super(NPUDistributedOptimizer, self).__init__(optimizer, "FakeDistributed")

    def compute_gradients(self, *args, **kwargs):  # the real one all-reduces and averages over RANK_SIZE
        return self._opt.compute_gradients(*args, **kwargs)

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        return self._opt.apply_gradients(grads_and_vars, global_step, name)


class NPULossScaleOptimizer(_Wrapper):
    def __init__(self, opt, loss_scale_manager, is_distributed=False):
        _record("NPULossScaleOptimizer", inner=type(opt).__name__, is_distributed=is_distributed,
                manager=[c.__name__ for c in type(loss_scale_manager).__mro__][:2])
        super(NPULossScaleOptimizer, self).__init__(opt, "FakeNPULossScale")
        self._manager = loss_scale_manager

    def compute_gradients(self, loss, var_list=None, **kwargs):
        scale = self._manager.get_loss_scale()
        pairs = self._opt.compute_gradients(loss * scale, var_list=var_list, **kwargs)
        return [(None if g is None else g / scale, v) for g, v in pairs]

    def apply_gradients(self, grads_and_vars, global_step=None, name=None):
        # The real one reads the NPU float status here; the fake checks the gradients.
        grads = [g for g, _ in grads_and_vars if g is not None]
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
        update = tf.cond(finite, lambda: tf.group(self._opt.apply_gradients(grads_and_vars, global_step, name)),
                         tf.no_op)
        return tf.group(update, self._manager.update_loss_scale(finite))


class _Hccl(object):
    @staticmethod
    def broadcast(tensor, root_rank, fusion=2, fusion_id=0, group="hccl_world_group"):
        _record("hccl_ops.broadcast", names=[t.op.name for t in tensor], root_rank=root_rank)
        return [tf.identity(t) for t in tensor]


hccl_ops = _Hccl()


class _IterationPerLoop(object):
    def create_iteration_per_loop_var(self, train_op):
        _record("IterationPerLoop.create", train_op=train_op.name)
        return tf.group(train_op, name="IterationOp")

    def load_iteration_per_loop_var(self, sess, iterations_per_loop=1):
        _record("IterationPerLoop.load", iterations_per_loop=iterations_per_loop)


class _Util(object):
    IterationPerLoop = _IterationPerLoop


util = _Util()
'''

RANK_TABLE_2 = {"version": "1.0", "server_count": "1", "status": "completed", "server_list": [
    {"server_id": "127.0.0.1", "host_nic_ip": "reserve",
     "device": [{"device_id": str(i), "device_ip": "192.168.100.10%d" % i, "rank_id": str(i)} for i in range(2)]}]}


def write_fake_npu_bridge(folder):
    package = os.path.join(str(folder), "npu_bridge")
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").write('"""FAKE npu_bridge (effnet-exp tests)."""\n')
    open(os.path.join(package, "npu_init.py"), "w").write(FAKE_NPU_BRIDGE)
    return str(folder)


def write_rank_table(folder, table=RANK_TABLE_2):
    path = os.path.join(str(folder), "rank_table.json")
    with open(path, "w") as f:
        json.dump(table, f)
    return path


@pytest.fixture
def fake_npu(tmp_path, monkeypatch):
    """The FAKE npu_bridge importable in this process; returns its npu_init module (CALLS records the calls)."""
    for name in [m for m in sys.modules if m == "npu_bridge" or m.startswith("npu_bridge.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(write_fake_npu_bridge(tmp_path))
    from npu_bridge import npu_init

    yield npu_init
    for name in [m for m in sys.modules if m == "npu_bridge" or m.startswith("npu_bridge.")]:
        del sys.modules[name]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RANK_SIZE", "RANK_ID", "RANK_TABLE_FILE", "ASCEND_DEVICE_ID", "DEVICE_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- the environment -------------------------------------------------------------------------------------------

def test_environment_parsing(tmp_path):
    table = write_rank_table(tmp_path)
    assert read_ascend_env({}) == AscendEnv(1, 0, None, None)
    assert read_ascend_env({"DEVICE_ID": "3"}) == AscendEnv(1, 0, None, 3)
    env = {"RANK_SIZE": "2", "RANK_ID": "1", "RANK_TABLE_FILE": table, "ASCEND_DEVICE_ID": "5", "DEVICE_ID": "7"}
    assert read_ascend_env(env) == AscendEnv(2, 1, table, 5)  # ASCEND_DEVICE_ID wins over DEVICE_ID
    assert read_ascend_env(dict(env, ASCEND_DEVICE_ID="")) == AscendEnv(2, 1, table, 7)
    group_list = {"group_count": "1", "group_list": [{"instance_list": [
        {"devices": [{"device_id": str(i)} for i in range(4)]}]}]}
    os.makedirs(str(tmp_path / "old"))
    old_table = write_rank_table(tmp_path / "old", group_list)
    assert read_ascend_env(dict(env, RANK_SIZE="4", RANK_TABLE_FILE=old_table)).rank_size == 4


@pytest.mark.parametrize("change, variable", [
    ({"RANK_SIZE": "two"}, "RANK_SIZE='two'"),
    ({"RANK_SIZE": "0"}, "RANK_SIZE='0'"),
    ({"RANK_ID": None}, "needs RANK_ID"),
    ({"RANK_ID": "2"}, "RANK_ID=2 is not below RANK_SIZE=2"),
    ({"RANK_ID": "-1"}, "RANK_ID='-1'"),
    ({"RANK_TABLE_FILE": None}, "needs RANK_TABLE_FILE"),
    ({"RANK_TABLE_FILE": "/nonexistent/table.json"}, "RANK_TABLE_FILE=/nonexistent/table.json: cannot read"),
    ({"ASCEND_DEVICE_ID": None}, "needs ASCEND_DEVICE_ID"),
    ({"ASCEND_DEVICE_ID": "x"}, "ASCEND_DEVICE_ID='x'"),
    ({"RANK_SIZE": "3"}, "lists 2 devices but RANK_SIZE=3"),
])
def test_environment_errors_name_the_variable(tmp_path, change, variable):
    env = {"RANK_SIZE": "2", "RANK_ID": "1", "RANK_TABLE_FILE": write_rank_table(tmp_path), "ASCEND_DEVICE_ID": "1"}
    for key, value in change.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(UserError) as err:
        read_ascend_env(env)
    assert variable in str(err.value) and "\n" not in str(err.value)


def test_placement_of_a_rank(fake_npu, tmp_path):
    """FAKE npu_bridge (importable): rank 1 of 2 trains one of 2 replicas, reads input shard 1 of 2, is not the
    chief and writes into rank_1/; only device=ascend reads the RANK_* variables."""
    env = {"RANK_SIZE": "2", "RANK_ID": "1", "RANK_TABLE_FILE": write_rank_table(tmp_path), "ASCEND_DEVICE_ID": "1"}
    placement = make_device(AscendDeviceConfig(), env).placement
    assert placement == Placement(replicas=2, processes=2, rank=1, chief=False, input_shards=2, input_shard=1,
                                  folder="rank_1")
    assert placement.device_batch(16) == 8 and placement.stream_batch(16) == 8
    assert make_device(AscendDeviceConfig(), dict(env, RANK_ID="0")).placement.chief
    assert make_device(CpuDeviceConfig(), env).placement == SINGLE


# --- graph wiring with the FAKE npu_bridge ----------------------------------------------------------------------

def toy_problem():
    """A variable w, a loss (w - 3)^2 * scale with a feedable scale (inf makes the step overflow)."""
    w = tf.compat.v1.get_variable("toy/kernel", initializer=1.0)
    scale = tf.compat.v1.placeholder_with_default(1.0, [])
    return w, tf.square(w - 3.0) * scale, scale


def test_fake_npu_optimizer_chain_and_overflow_counting(fake_npu, tmp_path, clean_env):
    """FAKE npu_bridge: checks that with RANK_SIZE=2 the optimizer is NPULossScaleOptimizer(NPUDistributedOptimizer(
    RMSProp), dynamic manager, is_distributed=True), that an overflow step is skipped but counted and the global
    step still advances, and that the non-finite watch tolerates overflow steps until the loss stays non-finite
    for train.max_nonfinite_steps steps in a row."""
    env = {"RANK_SIZE": "2", "RANK_ID": "1", "RANK_TABLE_FILE": write_rank_table(tmp_path), "ASCEND_DEVICE_ID": "1"}
    device = make_device(AscendDeviceConfig(loss_scale=LossScaleConfig(init_scale=1024.0, incr_every_n_steps=7)),
                         env)
    with tf.Graph().as_default():
        w, loss, scale = toy_problem()
        global_step = tf.compat.v1.train.get_or_create_global_step()
        opt, scaling = device.wrap_optimizer(tf.compat.v1.train.RMSPropOptimizer(0.1))
        train_op = scaling.apply_gradients(opt.compute_gradients(loss, [w]), global_step)
        monitors = scaling.monitors(train_op)
        calls = [c for c, _ in fake_npu.CALLS]
        assert calls == ["NPUDistributedOptimizer", "ExponentialUpdateLossScaleManager", "NPULossScaleOptimizer"]
        details = dict(fake_npu.CALLS)
        assert details["NPUDistributedOptimizer"]["inner"] == "RMSPropOptimizer"
        assert details["NPULossScaleOptimizer"]["inner"] == "NPUDistributedOptimizer"
        assert details["NPULossScaleOptimizer"]["is_distributed"] is True
        assert details["NPULossScaleOptimizer"]["manager"][1] == "ExponentialUpdateLossScaleManager"
        assert details["ExponentialUpdateLossScaleManager"] == {
            "init_loss_scale": 1024.0, "incr_every_n_steps": 7, "decr_every_n_nan_or_inf": 2, "incr_ratio": 2.0,
            "decr_ratio": 0.8}
        watch = NonFiniteWatch(section("train", "train.max_nonfinite_steps=3"), overflow_steps=0)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            _, extra, l = sess.run([train_op, monitors, loss])
            watch.note(1, l, extra, None)
            assert extra["overflow_steps"] == 0 and watch.streak == 0
            before = sess.run(w)
            _, extra, l = sess.run([train_op, monitors, loss], {scale: np.inf})
            assert sess.run(w) == before  # the update was skipped
            assert extra["overflow_steps"] == 1 and extra["loss_scale"] == pytest.approx(1024 * 0.8)
            assert sess.run(global_step) == 2  # the step counts anyway
            watch.note(2, l, extra, None)  # not a NaN fault (train.nonfinite_policy=stop) ...
            _, extra, l = sess.run([train_op, monitors, loss], {scale: np.inf})
            watch.note(3, l, extra, None)
            assert extra["overflow_steps"] == 2 and watch.streak == 2
            _, extra, l = sess.run([train_op, monitors, loss], {scale: np.inf})
            with pytest.raises(NonFiniteLoss) as err:  # ... unless the loss itself stays non-finite
                watch.note(4, l, extra, None)
            assert "not finite for 3 steps in a row, up to step 4" in str(err.value)


@pytest.mark.parametrize("precision_mode, scale, expected", [
    ("allow_fp32_to_fp16", "1024", ["FixedLossScaleManager", "NPULossScaleOptimizer"]),
    ("force_fp16", "none", []),
    ("must_keep_origin_dtype", "dynamic", []),
    ("allow_mix_precision_bf16", "dynamic", []),
])
def test_fake_npu_loss_scaling_follows_precision_mode(fake_npu, precision_mode, scale, expected):
    """FAKE npu_bridge: checks that loss scaling is wired only for precision modes that compute in float16 (and not
    with loss_scale.scale=none), with a FixedLossScaleManager for a fixed scale; one process: no distributed
    wrapper."""
    device = make_device(AscendDeviceConfig(precision_mode=PrecisionMode(precision_mode),
                                            loss_scale=LossScaleConfig(scale=scale)), {})
    with tf.Graph().as_default():
        opt, scaling = device.wrap_optimizer(tf.compat.v1.train.GradientDescentOptimizer(0.1))
    assert [c for c, _ in fake_npu.CALLS] == expected
    assert (scaling is not None) == bool(expected)
    if expected:
        assert dict(fake_npu.CALLS)["FixedLossScaleManager"]["loss_scale"] == 1024.0


def test_fake_npu_broadcast_covers_float_variables_and_step(fake_npu):
    """FAKE npu_bridge: checks that the rank-0 broadcast covers every float global variable (weights, batch-norm
    moving statistics, optimizer slots, moving averages) and the global step, and assigns them the result."""
    with tf.Graph().as_default():
        w = tf.compat.v1.get_variable("m/blocks_0/conv2d/kernel", initializer=1.0)
        mean = tf.compat.v1.get_variable("m/blocks_0/tpu_batch_normalization/moving_mean", initializer=0.0,
                                         trainable=False)
        counter = tf.compat.v1.get_variable("loss_scale/overflow_steps", initializer=tf.constant(0, tf.int64),
                                            trainable=False)
        step = tf.compat.v1.train.get_or_create_global_step()
        train = tf.compat.v1.train.MomentumOptimizer(0.1, 0.9).minimize(tf.square(w), global_step=step)
        WeightsAverage(0.99, step, [w, mean]).after(train)
        op = broadcast_variables_op(0)
        names = sorted(n for c, d in fake_npu.CALLS if c == "hccl_ops.broadcast" for n in d["names"])
        assert all(d["root_rank"] == 0 for c, d in fake_npu.CALLS if c == "hccl_ops.broadcast")
        assert names == sorted(["m/blocks_0/conv2d/kernel", "m/blocks_0/tpu_batch_normalization/moving_mean",
                                "m/blocks_0/conv2d/kernel/Momentum", "m/blocks_0/conv2d/kernel/ExponentialMovingAverage",
                                "m/blocks_0/tpu_batch_normalization/moving_mean/ExponentialMovingAverage",
                                "global_step"])
        assert counter.op.name not in names
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            sess.run(op)
            assert sess.run(w) == 1.0


def test_fake_npu_iterations_per_loop(fake_npu):
    """FAKE npu_bridge: checks that device.iterations_per_loop > 1 wraps the train op with util.IterationPerLoop and
    loads N once the session exists, and that 1 leaves the train op alone."""
    with tf.Graph().as_default():
        op = tf.no_op(name="train")
        assert make_device(AscendDeviceConfig(), {}).device_loop(op).train_op is op and fake_npu.CALLS == []
        loop = make_device(AscendDeviceConfig(iterations_per_loop=4), {}).device_loop(op)
        assert loop.train_op.name == "IterationOp" and loop.iterations == 4
        loop.load(None)
    assert fake_npu.CALLS == [("IterationPerLoop.create", {"train_op": "train"}),
                              ("IterationPerLoop.load", {"iterations_per_loop": 4})]


def fake_rank_env(tmp_path, rank, calls=None):
    """The environment of rank `rank` of 2 with the FAKE npu_bridge importable."""
    fake = write_fake_npu_bridge(tmp_path / "fake") if not (tmp_path / "fake").exists() else str(tmp_path / "fake")
    env = {"PYTHONPATH": os.pathsep.join([fake, os.environ.get("PYTHONPATH", "")]), "RANK_SIZE": "2",
           "RANK_ID": str(rank), "RANK_TABLE_FILE": write_rank_table(tmp_path), "ASCEND_DEVICE_ID": str(rank)}
    if calls:
        env["FAKE_NPU_LOG"] = calls
    return env


def test_fake_npu_rank1_writes_no_checkpoint(tmp_path, cache_dir, monkeypatch):
    """FAKE npu_bridge, in a real `run.py device=ascend` subprocess as rank 1 of 2: checks that it trains (through
    NPULossScaleOptimizer(is_distributed) around NPUDistributedOptimizer, variables broadcast from rank 0, its own
    shard of the files, half the global batch) and writes only its own folder rank_1/: no checkpoints, no
    eval.json and no TensorBoard summaries."""
    calls = str(tmp_path / "calls.jsonl")
    for key, value in fake_rank_env(tmp_path, 1, calls).items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["device=ascend", "model.pretrained=null", "train.eval_every=2",
                          "hydra.run.dir={}".format(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not list(run_dir.rglob("checkpoint*")) and not list(run_dir.rglob("eval.json"))
    assert not list(run_dir.rglob("tensorboard"))
    assert "eval top1" not in proc.stdout
    own = run_dir / "rank_1"
    metrics = [json.loads(line) for line in open(str(own / "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    assert not (run_dir / "metrics.jsonl").exists()
    log_text = open(str(own / "run.log")).read()
    assert "global batch 8 = 4 per device x 2 device(s); process 1 of 2; reads input shard 1 of 2, batch 4" in log_text
    assert "variables broadcast from rank 0" in log_text
    recorded = [json.loads(line) for line in open(calls)]
    names = [r["call"] for r in recorded]
    assert "NPUDistributedOptimizer" in names
    (lso,) = [r["details"] for r in recorded if r["call"] == "NPULossScaleOptimizer"]
    assert lso["is_distributed"] is True and lso["inner"] == "NPUDistributedOptimizer"
    broadcast = [n for r in recorded if r["call"] == "hccl_ops.broadcast" for n in r["details"]["names"]]
    assert "global_step" in broadcast and any(n.endswith("tpu_batch_normalization/moving_variance")
                                              for n in broadcast)


# --- a relaunched multi-rank job ----------------------------------------------------------------------------------

# lr=0 and no dropout / drop-connect: the weights never change, so each step's loss and top-1 depend only on the
# batch the rank reads. Equal per-step metrics then mean equal input positions (the FAKE NPUDistributedOptimizer
# does not average gradients across processes, so with lr>0 the ranks would drift apart by design of the fake).
RESUME_RUN = ["model.image_size=32", "train.batch_size=8", "train.steps=16", "train.log_every=1",
              "train.checkpoint_every=4", "optimizer.lr=0", "model.dropout_rate=0", "model.survival_prob=1.0",
              "model.pretrained=null", "mode=train"]


def launch_ranks(tmp_path, run_dir, cache_dir, signal_at=""):
    env = dict(os.environ, EFFNET_EXP_CACHE=cache_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=fake_rank_env(tmp_path, 0)["PYTHONPATH"], EFFNET_EXP_SIGNAL_AT=signal_at)
    return subprocess.Popen([sys.executable, "-m", "effnet_exp.tools.launch_ascend", "--devices", "2",
                             "--rank-table", write_rank_table(tmp_path), "--run-dir", str(run_dir), "--"] + RESUME_RUN,
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


def rank_metrics(run_dir, rank):
    """The rank's metrics.jsonl records ([] before its first logged step)."""
    path = (run_dir if rank == 0 else run_dir / "rank_{}".format(rank)) / "metrics.jsonl"
    return [json.loads(line) for line in open(str(path))] if path.exists() else []


def comparable(records):
    return [(r["step"], round(r["loss"], 5), round(r["top1"], 5)) for r in records]


def test_fake_npu_relaunched_ranks_resume_at_the_chiefs_step_and_input_position(tmp_path, cache_dir):
    """FAKE npu_bridge, 2 ranks as processes through the launcher: rank 0 gets SIGTERM while it saves its second
    checkpoint (it sends it to itself, see effnet_exp/interrupts.py; only the chief saves), the launcher then
    stops rank 1, and the job is relaunched with the same command. Every rank must resume at the step of rank 0's
    checkpoint, at the same input position of its own shard, and trim its own metrics.jsonl; so each rank's
    metrics equal those of an uninterrupted run, step for step."""
    whole = tmp_path / "whole"
    proc = launch_ranks(tmp_path, whole, cache_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    stopped = tmp_path / "stopped"
    proc = launch_ranks(tmp_path, stopped, cache_dir, signal_at="saving@2")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + 15, out + err
    assert "rank 0 exited with status 143" in err
    before = [comparable(rank_metrics(stopped, rank)) for rank in (0, 1)]
    proc = launch_ranks(tmp_path, stopped, cache_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    chief_step = before[0][-1][0]  # rank 0 logged and saved the step it stopped at
    assert chief_step == 8
    whole_records = [comparable(rank_metrics(whole, rank)) for rank in (0, 1)]
    for rank, folder in ((0, stopped), (1, stopped / "rank_1")):
        log_text = open(str(folder / "run.log")).read()
        assert "resuming from {}: the input stream continues after {} steps".format(
            stopped / "checkpoints" / "model.ckpt-{}".format(chief_step), chief_step) in log_text, rank
        # Without HCCL the fake ranks do not wait for each other: rank 1 may have been some steps behind or ahead
        # (or not yet training) when stopped. Its records up to the chief's step are kept, the later ones trained
        # again.
        kept = [r for r in before[rank] if r[0] <= chief_step]
        expected = kept + [r for r in whole_records[rank] if r[0] > chief_step]
        assert comparable(rank_metrics(stopped, rank)) == expected, rank
        assert set(expected) <= set(whole_records[rank]), rank


# --- the launcher ------------------------------------------------------------------------------------------------

def launch(args, cwd, timeout=60):
    env = dict(os.environ, PYTHONPATH=REPO)
    for name in ("RANK_SIZE", "RANK_ID", "RANK_TABLE_FILE", "ASCEND_DEVICE_ID", "DEVICE_ID"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "effnet_exp.tools.launch_ascend"] + args, cwd=str(cwd), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def test_launcher_starts_one_process_per_device(tmp_path):
    table = write_rank_table(tmp_path)
    child = ("import os; print(' '.join('%s=%s' % (k, os.environ.get(k)) for k in "
             "('RANK_SIZE', 'RANK_ID', 'ASCEND_DEVICE_ID', 'DEVICE_ID', 'RANK_TABLE_FILE')))")
    proc = launch(["--devices", "2", "--first-device", "4", "--rank-table", table, "--run-dir", "run", "--exec",
                   "--", sys.executable, "-c", child], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        text = open(str(tmp_path / "run" / "logs" / ("rank_%d.log" % rank))).read()
        assert text.strip() == "RANK_SIZE=2 RANK_ID={0} ASCEND_DEVICE_ID={1} DEVICE_ID={1} RANK_TABLE_FILE={2}".format(
            rank, 4 + rank, table)


def test_launcher_fails_the_job_when_a_rank_fails(tmp_path):
    table = write_rank_table(tmp_path)
    marker = tmp_path / "rank0_finished"
    child = ("import os, sys, time\n"
             "if os.environ['RANK_ID'] == '1': print('rank 1 breaks'); sys.exit(3)\n"
             "time.sleep(60); open({!r}, 'w').write('done')\n").format(str(marker))
    started = time.time()
    proc = launch(["--devices", "2", "--rank-table", table, "--run-dir", "run", "--grace", "5", "--exec", "--",
                   sys.executable, "-c", child], tmp_path)
    assert proc.returncode == 3
    assert time.time() - started < 30 and not marker.exists()  # rank 0 was stopped, not waited for
    assert "rank 1 exited with status 3" in proc.stderr and "rank 1 breaks" in proc.stderr


def test_sigterm_to_the_launcher_stops_every_rank(tmp_path):
    """A preempted job: SIGTERM to the launcher reaches each rank, and the launcher exits 143."""
    table = write_rank_table(tmp_path)
    child = ("import os, signal, sys, time\n"
             "def stop(signum, frame):\n"
             "    open('stopped_%s' % os.environ['RANK_ID'], 'w').write(str(signum)); sys.exit(128 + signum)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "open('started_%s' % os.environ['RANK_ID'], 'w').close()\n"
             "time.sleep(60)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "effnet_exp.tools.launch_ascend", "--devices", "2", "--rank-table",
                             table, "--run-dir", "run", "--exec", "--", sys.executable, "-c", child], cwd=str(tmp_path),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    deadline = time.time() + 60
    while not all((tmp_path / "started_{}".format(rank)).exists() for rank in (0, 1)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [(tmp_path / "stopped_{}".format(rank)).read_text() for rank in (0, 1)] == ["15", "15"]


def test_launcher_needs_a_rank_table_for_several_devices(tmp_path):
    proc = launch(["--devices", "2", "--exec", "--", sys.executable, "-c", "pass"], tmp_path)
    assert proc.returncode == 2 and "--rank-table" in proc.stderr
    table = write_rank_table(tmp_path)
    proc = launch(["--devices", "3", "--rank-table", table, "--exec", "--", sys.executable, "-c", "pass"], tmp_path)
    assert proc.returncode == 2 and "lists 2 devices but --devices 3" in proc.stderr
