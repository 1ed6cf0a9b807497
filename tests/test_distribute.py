"""Data parallelism with tf.distribute (device.strategy), really run on this machine's CPU: two logical CPU devices
in one process (mirrored) and two worker processes on localhost (multi_worker), each training the tiny model a few
steps through run.py, compared with one replica (no strategy) trained on the same global batches.

When is "the same" exact? Under a strategy each replica takes a contiguous half of every global batch of 8 and the
optimizer sums the replicas' gradients of loss / 2, which is the gradient of the global-batch mean loss, the
single-device gradient, up to float summation order. What differs is batch norm: in training mode each replica
normalises with the statistics of its own 4 images, which is not what one replica does with 8. So these runs use
train.freeze_bn=true (batch norm in inference mode with its moving statistics, not updated): then every image's
loss depends only on the weights and the image, and the runs must agree to float tolerance. Dropout and
drop-connect are off (no random masks) and every run starts from the same weights (model.pretrained: a checkpoint
written here, so that no run draws its own random classifier head). Momentum SGD, so the optimizer slots are
checkpointed and restored too; gradient clipping (of the global-batch gradient) and the moving average of the
weights are on in every run. Batch norm in training mode under the strategy (per-replica statistics, moving
averages averaged over the replicas) is checked separately: the two replicas' copies of the statistics agree.
"""
import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from hydra.errors import ConfigCompositionException

from conftest import RUN_PY, TINY, run_py
from effnet_exp.devices.config import check_device
from effnet_exp.devices.distribute import read_tf_config
from effnet_exp.devices.factory import make_device
from effnet_exp.errors import UserError
from factory import run_config

# Lite0 cut to its first 3 blocks (same variable names, a fraction of the graph-building time): the strategy code
# does not depend on the depth, and this file must stay fast on 2 cores.
# Every run clips the gradient's global norm to CLIP (small enough to be active: see _assert_clipped) and keeps a
# moving average of the weights, so both are compared with one replica too.
CLIP, LR, MOMENTUM = 0.5, 0.02, 0.9
MODEL = ["model.blocks=[r1_k3_s11_e1_i32_o16,r2_k3_s22_e6_i16_o24]"]
COMMON = TINY + MODEL + ["optimizer=momentum", "optimizer.lr=%g" % LR, "model.dropout_rate=0", "model.survival_prob=1.0",
                 "train.freeze_bn=true", "model.pretrained_weights=raw", "seed=3", "train.log_every=1",
                 "train.checkpoint_every=2", "mode=train", "train.clip_grad_norm=%g" % CLIP, "train.ema_decay=0.9"]
MIRRORED = ["device.strategy=mirrored", "device.replicas=2"]
STEPS = 3


def _env(extra=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.update(extra or {})
    return env


def _start(args, cwd, cache_dir, extra_env=None):
    return subprocess.Popen([sys.executable, RUN_PY] + list(args), cwd=str(cwd),
                            env=_env(dict(extra_env or {}, EFFNET_EXP_CACHE=cache_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


def _finish(procs, timeout=300):
    """Waits for all; if one fails, stops the others (a lone worker would wait for its peer forever)."""
    deadline = time.time() + timeout
    outputs = [None] * len(procs)
    while any(o is None for o in outputs):
        for i, proc in enumerate(procs):
            if outputs[i] is None and proc.poll() is not None:
                outputs[i] = proc.communicate()
                if proc.returncode != 0:
                    for other in procs:
                        if other.poll() is None:
                            other.kill()
        if time.time() > deadline:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        time.sleep(0.1)
    return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def _assert_all_succeeded(results):
    failed = [err[-3000:] for code, _, err in results if code != 0]
    assert not failed, "\n----\n".join(failed)


def _weights(run_dir, step=STEPS):
    prefix = str(run_dir / "checkpoints" / ("model.ckpt-%d" % step))
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def _assert_same_weights(got, want):
    assert sorted(got) == sorted(want)  # the same variable names, optimizer slots included
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """A 10-class Lite0 checkpoint with random weights: the common start of every run here."""
    from hydra import compose, initialize_config_dir

    from effnet_exp.config import register_configs
    from effnet_exp.model.efficientnet import build_efficientnet
    from effnet_exp.model.restore import model_variables

    register_configs()
    conf_dir = os.path.join(os.path.dirname(RUN_PY), "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        model_cfg = compose("config", overrides=["dataset.num_classes=10"] + MODEL).model
    prefix = str(tmp_path_factory.mktemp("start") / "start.ckpt")
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(7)
        build_efficientnet(tf.zeros([1, 32, 32, 3]), model_cfg, is_training=False)
        variables = model_variables(model_cfg.name)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.variables_initializer(variables))
            tf.compat.v1.train.Saver(variables).save(sess, prefix)
    return prefix


@pytest.fixture(scope="module")
def single_and_mirrored(tmp_path_factory, cache_dir, start_weights):
    """One replica for STEPS steps; at the same time the mirrored run's first 2 steps (it resumes later)."""
    cwd = tmp_path_factory.mktemp("runs")
    common = COMMON + ["model.pretrained=" + start_weights]
    single, mirrored = cwd / "single", cwd / "mirrored"
    results = _finish([
        _start(common + ["train.steps=%d" % STEPS, "hydra.run.dir=" + str(single)], cwd, cache_dir),
        _start(common + MIRRORED + ["train.steps=2", "hydra.run.dir=" + str(mirrored)], cwd, cache_dir)])
    _assert_all_succeeded(results)
    return cwd, common, single, mirrored


def test_mirrored_on_two_cpu_devices_matches_one_replica_and_resumes(single_and_mirrored, cache_dir, start_weights):
    cwd, common, single, mirrored = single_and_mirrored
    # The same command with more steps resumes from model.ckpt-2: weights, momentum slots, global step, and the
    # input stream after 2 global batches.
    proc = run_py(common + MIRRORED + ["train.steps=%d" % STEPS, "hydra.run.dir=" + str(mirrored)], cwd, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log_text = (mirrored / "run.log").read_text()
    assert "resumed from " + str(mirrored / "checkpoints" / "model.ckpt-2") in log_text
    assert "the input stream continues after 2 steps of global batch 8" in log_text
    assert "global batch 8 = 4 per device x 2 device(s); tf.distribute mirrored: 2 replicas on " \
           "/replica:0/task:0/device:CPU:0, /replica:0/task:0/device:CPU:1" in log_text
    assert "learning rate 0.02 (constant)" in log_text  # optimizer.lr as given: no scale_batch
    # The two replicas' copies of every variable are identical after training (checked in the process).
    assert "step 3: the copies of" in log_text and "on this process's 2 device(s) agree (largest |difference| 0)" \
        in log_text
    steps = [json.loads(l)["step"] for l in (mirrored / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    _assert_same_weights(_weights(mirrored), _weights(single))
    # Training really moved the weights (the comparison is not between two copies of the start).
    start = tf.compat.v1.train.NewCheckpointReader(start_weights)
    name = "efficientnet-lite0/head/dense/kernel"
    assert np.abs(_weights(single)[name] - start.get_tensor(name)).max() > 1e-4
    _assert_clipped(_weights(mirrored), start)
    averaged = [n for n in _weights(mirrored) if n.endswith("/ExponentialMovingAverage")]
    assert name + "/ExponentialMovingAverage" in averaged and len(averaged) > 10


def _assert_clipped(weights, start):
    """With every applied gradient's global norm at most CLIP, momentum SGD moves the weights by at most
    LR * CLIP * (1 + 1.9 + 2.71) in 3 steps (unclipped, these runs move them about 5 times further: 0.28)."""
    moved = np.sqrt(sum(np.sum((weights[n] - start.get_tensor(n)) ** 2) for n in start.get_variable_to_shape_map()))
    bound = LR * CLIP * sum(sum(MOMENTUM ** k for k in range(t)) for t in range(1, STEPS + 1))
    assert 0.2 * bound < moved <= bound * (1 + 1e-4), (moved, bound)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_localhost_match_one_replica_and_only_the_chief_writes(single_and_mirrored, cache_dir):
    cwd, common, single, _ = single_and_mirrored
    run_dir = cwd / "workers"
    cluster = {"worker": ["localhost:%d" % port for port in _free_ports(2)]}
    # With the skip policy on (its cross-worker check and condition around the update; these steps are finite,
    # so it must change nothing against the single replica, which runs without it).
    args = common + ["device.strategy=multi_worker", "train.steps=%d" % STEPS, "mode=train_eval",
                     "train.nonfinite_policy=skip", "hydra.run.dir=" + str(run_dir)]
    procs = [_start(args, cwd, cache_dir, {"TF_CONFIG": json.dumps({"cluster": cluster,
                                                                    "task": {"type": "worker", "index": i}})})
             for i in range(2)]
    results = _finish(procs)
    _assert_all_succeeded(results)
    # The chief (worker 0) wrote the run folder; worker 1 only its own folder, never a checkpoint or eval.json.
    written = sorted(os.path.relpath(p, str(run_dir)) for p in glob.glob(str(run_dir / "**" / "*"), recursive=True))
    assert [p for p in written if ".index" in p] == ["checkpoints/model.ckpt-2.index", "checkpoints/model.ckpt-3.index"]
    assert [p for p in written if p.endswith("eval.json")] == ["eval.json"]
    assert [p for p in written if "tfevents" in p and not p.startswith("tensorboard")] == []
    worker = sorted(p for p in written if p.startswith("worker_"))
    assert "worker_1/run.log" in worker and not any("checkpoints" in p or "tensorboard" in p for p in worker)
    assert "eval top1" in results[0][1] and "eval top1" not in results[1][1]
    chief_log, worker_log = (run_dir / "run.log").read_text(), (run_dir / "worker_1" / "run.log").read_text()
    assert "tf.distribute multi_worker: 2 replicas in all, this is worker:0 (worker 0 of 2, the chief)" in chief_log
    assert "this is worker:1 (worker 1 of 2)" in worker_log
    # Both workers end with the same weights (checksums), equal to one replica trained on the same batches.
    def checksum(text):
        return [l.rsplit("weights checksum", 1)[1] for l in text.splitlines() if "weights checksum" in l][-1]
    assert checksum(chief_log) == checksum(worker_log)
    _assert_same_weights(_weights(run_dir), _weights(single))


# Run in a fresh process (the logical CPU devices of a MirroredStrategy must exist before TensorFlow starts): two
# replicas, either of which can be given an infinite loss, updating w with the skip policy's condition ("skip") or
# through device=gpu's loss-scale optimizer ("loss_scale"); prints what each step did to the copies of the weights
# and momentum slots, the global step, and the loss-scale monitors.
_PROBE = """
import json, sys, types
import tensorflow as tf
from effnet_exp.devices.config import CpuDeviceConfig, GpuDeviceConfig, LossScaleConfig, Strategy
from effnet_exp.devices.factory import make_device

mode = sys.argv[1]
graph = tf.Graph()
with graph.as_default():
    replicas = make_device(CpuDeviceConfig(strategy=Strategy.mirrored, replicas=2)).replicas()
with graph.as_default(), replicas.scope():
    step = tf.compat.v1.train.get_or_create_global_step()
    bad = tf.compat.v1.placeholder(tf.int32, [])  # the replica whose loss is infinite (-1: none)
    w = tf.compat.v1.get_variable("w", initializer=[1.0, -2.0], use_resource=True)
    opt = tf.compat.v1.train.MomentumOptimizer(0.1, 0.9, use_nesterov=True)

    def replica_fn():
        rid = tf.distribute.get_replica_context().replica_id_in_sync_group
        loss = tf.reduce_sum(w * w) * tf.where(tf.equal(bad, rid), float("inf"), 1.0)
        if mode == "skip":
            grads_and_vars = opt.compute_gradients(loss, [w])
            finite = tf.logical_and(tf.math.is_finite(loss),
                                    tf.math.is_finite(tf.linalg.global_norm([grads_and_vars[0][0]])))
            return replicas.apply_if_finite(opt, grads_and_vars, finite, step), {}
        gpu = GpuDeviceConfig(mixed_precision=True, loss_scale=LossScaleConfig(init_scale=128.0, incr_every_n_steps=2))
        scaled, scaling = make_device(gpu).wrap_optimizer(opt)
        update = scaling.apply_gradients(scaled.compute_gradients(loss, [w]), step)
        return update, scaling.monitors(update)

    run = replicas.strategy.run if hasattr(replicas.strategy, "run") else replicas.strategy.experimental_run_v2
    update, monitors = run(replica_fn)
    train_op = replicas.strategy.group(update)
    monitors = {k: replicas.strategy.experimental_local_results(v)[0] for k, v in monitors.items()}
    slot = [v for v in tf.compat.v1.global_variables() if v.op.name == "w/Momentum"][0]
    copies = [tf.convert_to_tensor(c) for c in replicas.strategy.experimental_local_results(w)]
    slots = [tf.convert_to_tensor(c) for c in replicas.strategy.experimental_local_results(slot)]
    init = tf.compat.v1.global_variables_initializer()
with replicas.session(graph, tf.compat.v1.ConfigProto()) as sess:
    sess.run(init)
    states = []
    for which in [int(a) for a in sys.argv[2:]]:
        _, seen = sess.run([train_op, monitors], {bad: which})
        w_copies, m_copies, s = sess.run([copies, slots, step])
        scale = [float(sess.run(v)) for v in tf.compat.v1.global_variables() if v.op.name == "current_loss_scale"]
        states.append({"w": [c.tolist() for c in w_copies], "m": [c.tolist() for c in m_copies], "step": int(s),
                       "monitors": {k: float(v) for k, v in seen.items()}, "scale": scale})
print(json.dumps(states))
"""


def _probe(tmp_path, mode, bad_replicas):
    env = _env({"PYTHONPATH": os.path.dirname(RUN_PY)})
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode] + [str(b) for b in bad_replicas], cwd=str(tmp_path),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [s["step"] for s in states] == list(range(1, len(bad_replicas) + 1))  # every step counts
    for state in states:  # the two replicas' copies always agree
        assert state["w"][0] == state["w"][1] and state["m"][0] == state["m"][1]
    return states


def _assert_skipped_when_any_replica_is_not_finite(states):
    """States after steps with an infinite loss on replica 1, on none, on replica 0, on none."""
    skipped_1, updated_2, skipped_3, updated_4 = states
    assert skipped_1["w"][0] == [1.0, -2.0] and skipped_1["m"][0] == [0.0, 0.0]  # replica 1's inf stopped both
    # The finite step applies the gradient of the two replicas' losses summed: 2 * (2 w) = [4, -8].
    np.testing.assert_allclose(updated_2["m"][0], [4.0, -8.0])
    assert updated_2["w"][0] != [1.0, -2.0]
    assert skipped_3["w"] == updated_2["w"] and skipped_3["m"] == updated_2["m"]  # replica 0's inf stopped both
    assert updated_4["w"][0] != skipped_3["w"][0]


def test_skip_policy_skips_every_replica_when_one_replica_is_not_finite(tmp_path):
    """train.nonfinite_policy=skip under mirrored: an infinite loss on either replica skips the update on both
    (weights and momentum slots untouched, the step still counts); a finite step updates both alike."""
    _assert_skipped_when_any_replica_is_not_finite(_probe(tmp_path, "skip", [1, -1, 0, -1]))


def test_loss_scaling_under_mirrored_skips_and_counts_overflows_of_any_replica(tmp_path):
    """device=gpu device.mixed_precision=true under a strategy, without a GPU: the float16 rewrite cannot run here
    (test_recipe.py checks its session switch), but the loss-scale optimizer and the overflow counter do, on two
    logical CPU replicas: an overflow on either replica skips the step on both, is counted once and halves the
    dynamic scale; finite steps apply the unscaled gradient."""
    states = _probe(tmp_path, "loss_scale", [1, -1, 0, -1, -1])
    _assert_skipped_when_any_replica_is_not_finite(states[:4])
    assert [s["monitors"]["overflow_steps"] for s in states] == [1, 1, 2, 2, 2]
    # 128 halved by each overflow, doubled after incr_every_n_steps=2 finite steps in a row.
    assert [s["scale"] for s in states] == [[64], [64], [32], [32], [64]]
    if not tf.__version__.startswith("1."):
        # The monitor read with the step shows the scale after it; on TF 1.15 it can still show the one before
        # (the README says so).
        assert [s["monitors"]["loss_scale"] for s in states] == [64, 64, 32, 32, 64]


def test_skip_policy_under_mirrored_stops_like_one_replica(tmp_path, cache_dir):
    """The training loop with the skip policy under mirrored: diverging steps are skipped, counted and logged,
    and the run stops after train.max_nonfinite_steps in a row, as without a strategy (test_faults.py); the
    checkpoints of the skipped steps hold the weights and momentum slots of the last good one. (The batch-norm
    moving averages still take each batch's statistics while those are finite, with or without a strategy.)"""
    run_dir = tmp_path / "run"
    proc = run_py(TINY + MODEL + MIRRORED + ["model.pretrained=null", "optimizer=sgd_nesterov", "optimizer.lr=1e30",
                                             "train.log_every=1", "train.checkpoint_every=1", "train.steps=6",
                                             "train.nonfinite_policy=skip", "train.max_nonfinite_steps=3",
                                             "mode=train", "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not finite for 3 steps in a row, up to step 4" in proc.stderr
    assert "update skipped" in (run_dir / "run.log").read_text()
    after_good, after_skipped = _weights(run_dir, 1), _weights(run_dir, 3)
    for name in after_good:
        assert np.isfinite(after_skipped[name]).all(), name
        if name != "global_step" and "/moving_" not in name:
            np.testing.assert_array_equal(after_skipped[name], after_good[name], err_msg=name)
    assert any(name.endswith("/Momentum") for name in after_good)


def test_batch_not_divisible_by_the_replicas_is_one_clear_error(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["device.strategy=mirrored", "device.replicas=3", "hydra.run.dir=" + str(run_dir)],
                  tmp_path, cache_dir)
    assert proc.returncode == 2
    (line,) = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert "train.batch_size=8" in line and "device.replicas=3" in line, line
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def _check(*overrides, environ=None):
    """validate's device part for `python run.py <overrides>`: the schema's checks, the device, its run checks."""
    cfg = run_config(*(("train.batch_size=8",) + overrides))
    check_device(cfg.device)
    make_device(cfg.device, {} if environ is None else environ).check(cfg)


def test_strategy_config_errors_name_the_fields():
    mirrored = ("device.strategy=mirrored", "device.replicas=2")
    _check(*mirrored)
    _check("device.strategy=none", "device.replicas=0")
    _check("train.ema_decay=0.99", "train.clip_grad_norm=1.0", *mirrored)
    _check("train.nonfinite_policy=skip", "train.ema_decay=0.99", "train.clip_grad_norm=1.0", *mirrored)
    # Mixed precision is accepted under a strategy; what stops this one is that there is no GPU here.
    with pytest.raises(UserError, match=r"device=gpu device.strategy=mirrored device.replicas=0 \(every GPU\): no GPU"):
        _check("device=gpu", "device.strategy=mirrored", "device.mixed_precision=true", "train.nonfinite_policy=skip")
    with pytest.raises(UserError, match=r"cannot be combined with device.xla=true \(not supported yet"):
        _check("device.xla=true", *mirrored)
    with pytest.raises(ConfigCompositionException) as err:
        _check("device.strategy=horovod")
    assert "'horovod'" in str(err.value.__cause__) and "none, mirrored, multi_worker" in str(err.value.__cause__)
    with pytest.raises(UserError, match=r"device.replicas=2 needs device.strategy=mirrored"):
        _check("device.replicas=2")
    with pytest.raises(UserError, match=r"device=cpu device.strategy=mirrored needs device.replicas=N >= 1"):
        _check("device.strategy=mirrored")
    with pytest.raises(UserError, match=r"device=ascend has its own data parallelism"):
        check_device(run_config("device=ascend", "device.strategy=mirrored").device)
    _check("mode=eval", "train.ema_decay=0.99", *mirrored)  # evaluation runs on one device: no objection
    with pytest.raises(UserError, match=r"TF_CONFIG"):
        _check("device.strategy=multi_worker")
    three = {"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:1", "c:1"]},
                                      "task": {"type": "worker", "index": 2}})}
    with pytest.raises(UserError, match=r"train.batch_size=8 is not divisible by the 3 replicas"):
        _check("device.strategy=multi_worker", environ=three)


def test_tf_config_chief_and_worker_ids():
    def task(cluster, task_type, index):
        return read_tf_config({"TF_CONFIG": json.dumps({"cluster": cluster,
                                                        "task": {"type": task_type, "index": index}})})
    workers = {"worker": ["a:1", "b:1"]}
    assert task(workers, "worker", 0)[:5] == ("worker", 0, 0, 2, True)
    assert task(workers, "worker", 1)[:5] == ("worker", 1, 1, 2, False)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert task(with_chief, "chief", 0)[:5] == ("chief", 0, 0, 3, True)
    assert task(with_chief, "worker", 0)[:5] == ("worker", 0, 1, 3, False)
    with pytest.raises(UserError, match=r"not in its cluster"):
        task(workers, "worker", 2)
    with pytest.raises(UserError, match=r"only chief and worker tasks, not ps"):
        task(dict(workers, ps=["p:1"]), "worker", 0)
    with pytest.raises(UserError, match=r"not JSON"):
        read_tf_config({"TF_CONFIG": "{cluster"})
