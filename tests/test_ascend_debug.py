"""device=ascend's profiling, dump and precision-debugging switches (docs/ascend.md).

The session-config tests use the FAKE npu_bridge of test_ascend.py (importable, plain TensorFlow; NOT Huawei's
adapter): they check OUR wiring, that each switch lands in the NpuOptimizer's parameter_map under the key and with
the value type and format that the adapter's session parser reads (tf_adapter/util/npu_attrs.cc, cited in
docs/ascend.md; the expected keys and values below are written from it), never the adapter itself.
"""
import json
import os

import pytest
from hydra.errors import ConfigCompositionException

from conftest import REPO, TINY, run_py
from effnet_exp.devices.base import Purpose
from effnet_exp.devices.config import check_device
from effnet_exp.devices.factory import make_device
from effnet_exp.errors import UserError
from factory import run_config
from test_ascend import clean_env, fake_npu, write_rank_table  # noqa: F401  (fixtures: the FAKE npu_bridge)

# The keys this issue adds, as the adapter spells them, with the protobuf field the adapter reads for each.
DEBUG_KEYS = {"profiling_mode": "b", "profiling_options": "s", "enable_dump": "b", "dump_path": "s", "dump_step": "s",
              "dump_mode": "s", "enable_dump_debug": "b", "dump_debug_mode": "s", "fusion_switch_file": "s",
              "op_debug_level": "i", "op_select_implmode": "s", "enable_exception_dump": "i", "hcom_parallel": "b",
              "hccl_timeout": "i"}
PRECISION_KEYS = {"fusion_switch_file", "op_debug_level", "op_select_implmode", "enable_exception_dump"}


def npu_params(device, purpose):
    rewrite = device.session_config(purpose).graph_options.rewrite_options
    (custom,) = [o for o in rewrite.custom_optimizers if o.name == "NpuOptimizer"]
    return custom.parameter_map


def ascend(*overrides):
    return run_config("device=ascend", *overrides)


def fusion_switch_file(folder):
    """A fusion switch file (only its path is ours to pass on)."""
    path = os.path.join(str(folder), "fusion_off.json")
    with open(path, "w") as f:
        json.dump({"Switch": {"GraphFusion": {"ALL": "off"}, "UBFusion": {"ALL": "off"}}}, f)
    return path


def test_every_switch_lands_under_the_adapters_key(fake_npu, tmp_path, clean_env):
    """FAKE npu_bridge: a data dump, profiling and every precision switch, in training and inference sessions."""
    switches = fusion_switch_file(tmp_path)
    cfg = ascend("device.profiling.enabled=true", "device.profiling.task_trace=false",
                 "device.profiling.fp_point=efficientnet-b0/stem/conv2d/Conv2D",
                 "device.profiling.bp_point=gradients/efficientnet-b0/stem/conv2d/Conv2D_grad/Conv2DBackpropFilter",
                 "device.profiling.aic_metrics=Memory", "device.dump.mode=data", 'device.dump.steps="0|5|10-20"',
                 "device.dump.data=all", "device.fusion_switch_file=" + switches, "device.op_debug_level=2",
                 "device.op_select_implmode=high_precision", "device.enable_exception_dump=true",
                 "device.hcom_parallel=false", "device.hccl_timeout=1800")
    check_device(cfg.device)
    device = make_device(cfg.device, {})
    device.check(cfg)
    run_dir = tmp_path / "run"
    device.use_folder(str(run_dir))
    train = npu_params(device, Purpose.TRAIN)
    for key in DEBUG_KEYS:
        if key in train:
            assert train[key].WhichOneof("value") == DEBUG_KEYS[key], key
    assert train["profiling_mode"].b is True
    assert json.loads(train["profiling_options"].s.decode()) == {
        "output": str(run_dir / "profiling"), "training_trace": "on", "task_trace": "off", "aicpu": "on",
        "fp_point": "efficientnet-b0/stem/conv2d/Conv2D",
        "bp_point": "gradients/efficientnet-b0/stem/conv2d/Conv2D_grad/Conv2DBackpropFilter", "aic_metrics": "Memory"}
    assert train["enable_dump"].b is True and "enable_dump_debug" not in train
    assert train["dump_path"].s == str(run_dir / "dump").encode()
    assert train["dump_step"].s == b"0|5|10-20" and train["dump_mode"].s == b"all"
    assert (run_dir / "profiling").is_dir() and (run_dir / "dump").is_dir()  # the adapter wants existing folders
    assert train["fusion_switch_file"].s == switches.encode()
    assert train["op_debug_level"].i == 2 and train["op_select_implmode"].s == b"high_precision"
    assert train["enable_exception_dump"].i == 1
    assert train["hcom_parallel"].b is False and train["hccl_timeout"].i == 1800
    inference = npu_params(device, Purpose.INFERENCE)
    assert set(DEBUG_KEYS) & set(inference) == PRECISION_KEYS  # evaluation compiles the graph that was trained
    for key in PRECISION_KEYS:
        assert inference[key] == train[key], key


def test_inference_runs_get_profiling_and_dumps(fake_npu, tmp_path, clean_env):
    """FAKE npu_bridge: mode=eval / predict / export profile and dump their inference sessions instead."""
    cfg = ascend("mode=eval", "device.profiling.enabled=true", "device.dump.mode=overflow")
    device = make_device(cfg.device, {})
    device.check(cfg)
    device.use_folder(str(tmp_path))
    inference, train = npu_params(device, Purpose.INFERENCE), npu_params(device, Purpose.TRAIN)
    assert inference["profiling_mode"].b is True and inference["enable_dump_debug"].b is True
    assert "profiling_mode" not in train and "enable_dump_debug" not in train


def test_overflow_dump_and_defaults(fake_npu, tmp_path, clean_env):
    """FAKE npu_bridge: an overflow dump is the adapter's enable_dump_debug + dump_debug_mode; by default no
    debugging key is set except hcom_parallel (ModelZoo's true) in training sessions."""
    default = make_device(ascend().device, {})
    assert set(DEBUG_KEYS) & set(npu_params(default, Purpose.TRAIN)) == {"hcom_parallel"}
    assert npu_params(default, Purpose.TRAIN)["hcom_parallel"].b is True
    assert not set(DEBUG_KEYS) & set(npu_params(default, Purpose.INFERENCE))
    device = make_device(ascend("device.dump.mode=overflow", "device.dump.overflow=aicore_overflow",
                                "device.dump.output=overflow_dump").device, {})
    device.use_folder(str(tmp_path))
    params = npu_params(device, Purpose.TRAIN)
    assert params["enable_dump_debug"].b is True and params["dump_debug_mode"].s == b"aicore_overflow"
    assert params["dump_path"].s == str(tmp_path / "overflow_dump").encode()  # relative: inside the run folder
    assert "enable_dump" not in params and "dump_mode" not in params and "dump_step" not in params


def test_a_ranks_outputs_go_to_its_own_folder(fake_npu, tmp_path, clean_env):
    """FAKE npu_bridge, rank 1 of 2: defaults in its rank_1/ folder (the one prepare() gives it), an absolute
    output in that folder's rank_1/ sub-folder, so that two ranks never write the same files."""
    env = {"RANK_SIZE": "2", "RANK_ID": "1", "RANK_TABLE_FILE": write_rank_table(tmp_path), "ASCEND_DEVICE_ID": "1"}
    shared = tmp_path / "shared_dumps"
    device = make_device(ascend("device.profiling.enabled=true", "device.dump.mode=data",
                                "device.dump.output=" + str(shared)).device, env)
    own = tmp_path / "run" / device.placement.folder
    device.use_folder(str(own))
    params = npu_params(device, Purpose.TRAIN)
    assert json.loads(params["profiling_options"].s.decode())["output"] == str(tmp_path / "run" / "rank_1" / "profiling")
    assert params["dump_path"].s == str(shared / "rank_1").encode()
    assert (shared / "rank_1").is_dir()


@pytest.mark.parametrize("overrides, message", [
    (["device.dump.mode=data", "device.dump.steps='5-3'"], "device.dump.steps='5-3'"),
    (["device.dump.mode=data", "device.dump.steps='0,5'"], "device.dump.steps='0,5' is not CANN's dump_step syntax"),
    (["device.dump.mode=data", "device.dump.steps='|3'"], "device.dump.steps='|3'"),
    (["device.dump.mode=data", "device.dump.steps='{}'".format("|".join(str(i) for i in range(101)))], "has 101 groups"),
    (["device.dump.mode=overflow", "device.dump.steps=3"], "device.dump.steps='3' is only used with "
                                                           "device.dump.mode=data"),
    (["device.fusion_switch_file=/nonexistent/fusion.json"], "device.fusion_switch_file=/nonexistent/fusion.json: "
                                                             "no such file"),
    (["device.op_debug_level=-1"], "device.op_debug_level=-1"),
    (["device.hccl_timeout=0"], "device.hccl_timeout=0"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(UserError) as err:
        check_device(ascend(*overrides).device)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_example_files_are_accepted(monkeypatch):
    """conf/ascend/'s documented examples: JSON, in the shape docs/ascend.md describes, and accepted as the two
    switches (relative to the repository, as in the docs' commands)."""
    mixlist = os.path.join("conf", "ascend", "mixlist_keep_fp32.json")
    switches = os.path.join("conf", "ascend", "fusion_off.json")
    with open(os.path.join(REPO, mixlist)) as f:
        assert json.load(f) == {"black-list": {"to-add": ["Sigmoid"]}}
    with open(os.path.join(REPO, switches)) as f:
        assert json.load(f) == {"Switch": {"GraphFusion": {"ALL": "off"}, "UBFusion": {"ALL": "off"}}}
    monkeypatch.chdir(REPO)
    check_device(ascend("device.modify_mixlist=" + mixlist, "device.fusion_switch_file=" + switches).device)


def test_good_dump_steps_pass():
    for steps in ("0", "0|5|10", "10-20", "0|5|10-20|50-100"):
        check_device(ascend("device.dump.mode=data", 'device.dump.steps="{}"'.format(steps)).device)


@pytest.mark.parametrize("override, names", [
    ("device.dump.mode=foo", ["device.dump.mode", "foo", "overflow"]),
    ("device.dump.data=both", ["device.dump.data", "both", "input"]),
    ("device.op_select_implmode=fast", ["device.op_select_implmode", "fast", "high_precision"]),
    ("device.profiling.aic_metrics=cache", ["device.profiling.aic_metrics", "cache", "PipeUtilization"]),
])
def test_bad_choices_are_rejected_by_the_schema(override, names):
    with pytest.raises(ConfigCompositionException) as err:
        ascend(override)
    message = str(err.value) + str(err.value.__cause__)
    for name in names:
        assert name in message


@pytest.mark.parametrize("device", ["cpu", "gpu"])
@pytest.mark.parametrize("override", ["device.profiling.enabled=true", "device.dump.mode=overflow",
                                      "device.fusion_switch_file=f.json", "device.op_debug_level=1",
                                      "device.op_select_implmode=high_precision",
                                      "device.enable_exception_dump=true", "device.hcom_parallel=false",
                                      "device.hccl_timeout=60"])
def test_only_ascend_has_the_fields(device, override):
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(ConfigCompositionException) as err:
        run_config("device=" + device, override)
    assert key in str(err.value) + str(err.value.__cause__)


def test_run_py_stops_before_any_work(tmp_path, cache_dir):
    """A bad value of a debugging switch: one error line naming the key and value, exit 2, nothing trained."""
    run_dir = tmp_path / "run"
    proc = run_py(TINY + ["device=ascend", "device.dump.mode=data", "device.dump.steps=10-2",
                          "hydra.run.dir=" + str(run_dir)], tmp_path, cache_dir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "device.dump.steps='10-2'" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
