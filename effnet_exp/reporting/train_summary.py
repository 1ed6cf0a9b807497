"""The ModelZoo-style summary of a training run: one console line and train_summary.json in this process's folder.

Huawei's ModelZoo scripts end with ActualFPS (images/s), TrainingTime (ms per step), ActualLoss (the last logged
loss) and E2ETrainingTime. The same figures here come from the metrics.jsonl records the trainer wrote during
this start of the run (a resumed run: the steps after the checkpoint it resumed from). Each record covers the
steps since the one before, at the images/s it logged, so the interval's time is steps x global batch / images/s.
The timed steps are all but the first logged interval, whose time holds the graph's first run (TensorFlow's
graph optimisation; on an NPU the whole graph compilation, minutes long); with a single interval there is
nothing to leave out and the summary says so. No TensorFlow import here.
"""
import logging
import os

from effnet_exp import run_folder
from effnet_exp.reporting.files import split_metrics

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"


def summarize(records, start_step, global_batch, replicas, train_sec):
    """The summary dict of the training records after start_step, or None without any."""
    train, _ = split_metrics(records)
    own = [r for r in train if r["step"] > start_step and r.get("images_per_sec")]
    if not own:
        return None
    intervals, previous = [], start_step
    for record in own:
        steps = record["step"] - previous
        intervals.append((previous + 1, record["step"], steps, steps * global_batch / record["images_per_sec"]))
        previous = record["step"]
    timed = intervals[1:] or intervals
    steps = sum(i[2] for i in timed)
    seconds = sum(i[3] for i in timed)
    images_per_sec = steps * global_batch / seconds
    return {"images_per_sec": images_per_sec, "images_per_sec_per_device": images_per_sec / replicas,
            "ms_per_step": 1000.0 * seconds / steps, "timed_steps": [timed[0][0], timed[-1][1]],
            "first_interval_left_out": len(intervals) > 1, "final_loss": own[-1]["loss"],
            "final_step": own[-1]["step"], "first_step": start_step + 1, "global_batch": global_batch,
            "replicas": replicas, "train_sec": train_sec}


def summary_line(summary):
    loss = summary["final_loss"]
    first, last = summary["timed_steps"]
    left_out = " (the first logged interval, with the graph's first run, left out)" \
        if summary["first_interval_left_out"] else " (a single logged interval: its first step included)"
    return ("train summary: {:.1f} images/s ({:.1f} per device), {:.1f} ms/step over steps {}-{}{}; final loss {} "
            "at step {}; training {:.1f} s end to end").format(
        summary["images_per_sec"], summary["images_per_sec_per_device"], summary["ms_per_step"], first, last,
        left_out, "nan" if loss is None else "{:.4f}".format(loss), summary["final_step"], summary["train_sec"])


def write_train_summary(spec, train_sec):
    """Logs the summary line of this process's metrics.jsonl (console and run.log) and writes its
    train_summary.json; returns the line, or None when this start logged no training step (a run resumed after
    its last step)."""
    records = run_folder.read_metrics(run_folder.metrics_path(spec.own_dir))
    summary = summarize(records, spec.resume_step, spec.cfg.train.batch_size, spec.placement.replicas, train_sec)
    if summary is None:
        log.info("no training step logged in this start: no %s", TRAIN_SUMMARY)
        return None
    summary["device"] = spec.device.name
    line = summary_line(summary)
    log.info("%s", line)
    path = os.path.join(spec.own_dir, TRAIN_SUMMARY)
    try:
        run_folder.atomic_write_json(path, summary)
    except (IOError, OSError) as err:  # the checkpoints are written: a missing summary must not fail the run
        log.warning("could not write %s: %s", path, err.strerror or err)
    return line
