"""The ModelZoo-style training summary (effnet_exp/reporting/train_summary.py): figures by hand on written
records, then real training runs on the CPU and on device=ascend with the FAKE npu_bridge of test_ascend.py
(plain TensorFlow, NOT Huawei's adapter), with the figures recomputed here from their metrics.jsonl."""
import json
import logging
import time

import pytest

from conftest import metrics, read_json
from effnet_exp.experiment import prepare, run
from effnet_exp.reporting.train_summary import TRAIN_SUMMARY, summarize, summary_line
from factory import run_config
from test_ascend import clean_env, fake_npu  # noqa: F401  (fixtures: the FAKE npu_bridge)

RECORDS = [  # batch 10: steps 1-2 in 4 s (the first run of the graph), 3-4 in 1 s, 5-6 in 2 s
    {"step": 2, "loss": 2.5, "top1": 0.1, "images_per_sec": 5.0},
    {"step": 4, "loss": 2.0, "top1": 0.2, "images_per_sec": 20.0},
    {"step": 4, "eval_top1": 0.3},
    {"step": 6, "loss": 1.5, "top1": 0.3, "images_per_sec": 10.0},
]


def test_figures_leave_the_first_interval_out():
    summary = summarize(RECORDS, start_step=0, global_batch=10, replicas=2, train_sec=12.5)
    assert summary["timed_steps"] == [3, 6] and summary["first_interval_left_out"] is True
    assert summary["images_per_sec"] == pytest.approx(40 / 3.0)  # 4 steps x 10 images in 1 s + 2 s
    assert summary["images_per_sec_per_device"] == pytest.approx(20 / 3.0)
    assert summary["ms_per_step"] == pytest.approx(750.0)
    assert (summary["final_loss"], summary["final_step"], summary["train_sec"]) == (1.5, 6, 12.5)
    line = summary_line(summary)
    assert "13.3 images/s (6.7 per device), 750.0 ms/step over steps 3-6" in line
    assert "final loss 1.5000 at step 6; training 12.5 s end to end" in line


def test_a_resumed_start_summarizes_its_own_steps():
    """Resumed from step 2: the record of the earlier start is not this start's; its first interval is 3-4."""
    summary = summarize(RECORDS, start_step=2, global_batch=10, replicas=1, train_sec=3.0)
    assert summary["timed_steps"] == [5, 6] and summary["ms_per_step"] == pytest.approx(1000.0)
    assert summary["first_step"] == 3


def test_a_single_interval_is_timed_whole_and_says_so():
    summary = summarize(RECORDS[:1] + [{"step": 3, "loss": None, "images_per_sec": 1.0}], start_step=2,
                        global_batch=10, replicas=1, train_sec=11.0)
    assert summary["timed_steps"] == [3, 3] and summary["first_interval_left_out"] is False
    assert summary["ms_per_step"] == pytest.approx(10000.0)
    line = summary_line(summary)
    assert "a single logged interval" in line and "final loss nan" in line
    assert summarize(RECORDS, start_step=6, global_batch=10, replicas=1, train_sec=0.0) is None


@pytest.mark.parametrize("device", ["cpu", "ascend"])
def test_a_training_run_writes_the_summary(device, request, tmp_path, cache_dir, caplog, monkeypatch):
    """A real training run (device=ascend: FAKE npu_bridge, profiling and an overflow dump on): the line on the
    console and train_summary.json in the run folder, equal to the figures of its metrics.jsonl; the Ascend
    profile and dump folders inside the run folder."""
    if device == "ascend":
        request.getfixturevalue("fake_npu")
        request.getfixturevalue("clean_env")
    monkeypatch.setenv("EFFNET_EXP_CACHE", cache_dir)
    extra = ["device=ascend", "device.profiling.enabled=true", "device.dump.mode=overflow"] \
        if device == "ascend" else []
    cfg = run_config("mode=train", "model.image_size=32", "train.batch_size=8", "train.steps=4", "train.log_every=1",
                     "train.checkpoint_every=4", "model.pretrained=null", *extra)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.INFO, logger="effnet_exp"):
        spec = prepare(cfg, str(run_dir))
        started = time.time()
        run(spec)
        took = time.time() - started
    summary = read_json(str(run_dir / TRAIN_SUMMARY))
    records = metrics(str(run_dir))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    seconds = sum(8 / r["images_per_sec"] for r in records[1:])  # each logged interval is one step of 8 images
    assert summary["images_per_sec"] == pytest.approx(3 * 8 / seconds)
    assert summary["ms_per_step"] == pytest.approx(1000 * seconds / 3)
    assert summary["timed_steps"] == [2, 4] and summary["final_loss"] == records[-1]["loss"]
    assert summary["device"] == device and summary["global_batch"] == 8
    assert seconds < summary["train_sec"] <= took
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train summary:")]
    assert "{:.1f} ms/step over steps 2-4".format(summary["ms_per_step"]) in line
    if device == "ascend":
        assert (run_dir / "profiling").is_dir() and (run_dir / "dump").is_dir()
    assert json.dumps(summary)  # plain JSON values
