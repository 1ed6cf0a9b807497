"""The sweep report: summary.csv, summary.md and summary.png in a sweep folder, built from its jobs' files only.

Per job folder (any folder under the sweep holding `.hydra/overrides.yaml` or `status.json`):
`.hydra/overrides.yaml` (the job's overrides), `status.json` (running / completed / failed + the error's
first line, wall time), `eval.json` (final top-1 with its 95% interval, top-5, balanced accuracy, step, an early
stop), `metrics.jsonl` (images/s, eval_top1 records, loss curve). So the report can be rebuilt at any time:
`python -m effnet_exp.tools.summarize DIR`.
"""
import csv
import io
import logging
import os

import yaml

from effnet_exp import run_folder
from effnet_exp.reporting.files import eval_points, split_metrics
from effnet_exp.reporting.jobs import COMPLETED, FAILED, STATUS_FILE
from effnet_exp.reporting.plots import draw_sweep

log = logging.getLogger(__name__)

SUMMARY_CSV, SUMMARY_MD, SUMMARY_PNG = "summary.csv", "summary.md", "summary.png"
COLUMNS = ("job", "overrides", "status", "error", "top1", "top1_ci95_low", "top1_ci95_high", "top5",
           "balanced_accuracy", "best_top1", "steps", "stopped_early", "images_per_sec", "wall_sec", "folder")
_SKIP = {run_folder.HYDRA_DIR, ".submitit", run_folder.CHECKPOINT_DIR, run_folder.TENSORBOARD, run_folder.EXPORT_DIR}


class SweepReport(object):
    def __init__(self, sweep_dir, rows, jobs):
        self.sweep_dir = sweep_dir
        self.rows = rows
        self.jobs = jobs  # per row: (train records, eval points), for the figure
        self.common = []  # overrides every job has

    @property
    def failed(self):
        """Rows of jobs that did not complete (failed, or still marked running: killed)."""
        return [r for r in self.rows if r["status"] != COMPLETED]


def find_jobs(sweep_dir):
    """The job folders under sweep_dir, in job-number order (then by path)."""
    found = []
    for folder, subdirs, files in os.walk(sweep_dir):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIP)
        if folder == sweep_dir:
            continue
        if STATUS_FILE in files or os.path.isfile(os.path.join(folder, run_folder.HYDRA_OVERRIDES)):
            found.append(folder)
            subdirs[:] = []  # a job folder holds no other job
    return found


def _overrides(job_dir, status):
    path = os.path.join(job_dir, run_folder.HYDRA_OVERRIDES)
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f)
        if isinstance(loaded, list):
            return [str(o) for o in loaded]
    except (IOError, OSError, yaml.YAMLError):
        pass
    return list(status.get("overrides") or [])


def _mean_images_per_sec(train):
    """Mean images/s over the logged intervals, leaving out the first (graph warm-up) when there are more."""
    values = [r["images_per_sec"] for r in train if r.get("images_per_sec")]
    if len(values) > 1:
        values = values[1:]
    return sum(values) / len(values) if values else None


def job_row(sweep_dir, job_dir):
    """One row of the report, and (train records, eval points) for the figure."""
    status = run_folder.read_json(os.path.join(job_dir, STATUS_FILE)) or {}
    final = run_folder.read_json(run_folder.eval_path(job_dir)) or {}
    train, evals = split_metrics(run_folder.read_metrics(run_folder.metrics_path(job_dir)))
    points = eval_points(job_dir, evals)
    folder = os.path.relpath(job_dir, sweep_dir)
    state = status.get("status") or (COMPLETED if final else "unknown")
    job = status.get("job_num")
    if job is None:
        job = int(folder) if folder.isdigit() else folder
    top1s = [v for _, v in points if v is not None]
    # After an early stop eval.json is the best checkpoint's (an earlier step); the job trained up to the stop.
    stop = final.get("early_stop") or {}
    steps = stop.get("step", final.get("step"))
    if steps is None and train:
        steps = train[-1]["step"]
    wall = status.get("wall_sec")
    if wall is None and train:
        wall = train[-1].get("elapsed_sec")
    low, high = final.get("top1_ci95") or (None, None)
    row = {"job": job, "overrides": _overrides(job_dir, status), "status": state,
           "error": status.get("error") or "", "top1": final.get("top1"), "top1_ci95_low": low,
           "top1_ci95_high": high, "top5": final.get("top5"), "balanced_accuracy": final.get("balanced_accuracy"),
           "best_top1": max(top1s) if top1s else None, "steps": steps, "stopped_early": stop.get("step"),
           "images_per_sec": _mean_images_per_sec(train), "wall_sec": wall, "folder": folder}
    return row, (train, points)


def _sort_key(item):
    row = item[0]
    top1 = row["top1"]
    has_top1 = top1 is not None and top1 == top1
    job = row["job"]
    return (row["status"] != COMPLETED, not has_top1, -(top1 if has_top1 else 0.0),
            (0, job, "") if isinstance(job, int) else (1, 0, str(job)))


def collect(sweep_dir):
    """A SweepReport of sweep_dir, rows sorted by final top-1 (completed first, best first)."""
    sweep_dir = os.path.abspath(sweep_dir)
    items = sorted((job_row(sweep_dir, job_dir) for job_dir in find_jobs(sweep_dir)), key=_sort_key)
    rows = [row for row, _ in items]
    common = _common_overrides([row["overrides"] for row in rows])
    report = SweepReport(sweep_dir, rows, [curves for _, curves in items])
    report.common = [o for o in rows[0]["overrides"] if o in common] if rows else []
    for row in rows:  # what tells the jobs apart, for the table and the figure's legend
        row["swept"] = " ".join(o for o in row["overrides"] if o not in common)
        row["overrides"] = " ".join(row["overrides"])
    return report


def _common_overrides(lists):
    if len(lists) < 2:
        return set()
    common = set(lists[0])
    for overrides in lists[1:]:
        common &= set(overrides)
    return common


def _fmt(value, digits=4):
    if value is None:
        return ""
    if isinstance(value, float):
        return "{:.{}f}".format(value, digits)
    return str(value)


def _csv_text(rows):
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_fmt(row[c], 6) if isinstance(row[c], float) else _fmt(row[c]) for c in COLUMNS])
    return out.getvalue()


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status_cell(row):
    if row["status"] == FAILED:
        return "failed: " + row["error"]
    if row["stopped_early"] is not None:
        return "{}, stopped early at step {}".format(row["status"], row["stopped_early"])
    return row["status"]


def _interval(row):
    low, high = row["top1_ci95_low"], row["top1_ci95_high"]
    return "" if low is None else "[{}, {}]".format(_fmt(low), _fmt(high))


def _md_text(report):
    rows = report.rows
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = ["# Sweep {}".format(report.sweep_dir), "",
             "{} job(s): {}. Sorted by final eval top-1 (with its bootstrap 95% interval over the eval images); "
             "`best top-1` is the best periodic or final evaluation.".format(
                 len(rows), ", ".join("{} {}".format(n, s) for s, n in sorted(counts.items())))
             if rows else "No job folders found.", ""]
    if any(row["stopped_early"] is not None for row in rows):
        lines += ["A job that stopped early (`train.early_stopping`) has the top-1 of its best checkpoint and, as "
                  "`steps`, the step it stopped at.", ""]
    if report.common:
        lines += ["Overrides of every job: `{}`; the table shows the others.".format(" ".join(report.common)), ""]
    header = ("job", "overrides", "status", "top-1", "top-1 95% CI", "top-5", "balanced accuracy", "best top-1",
              "steps", "images/s", "wall time (s)", "folder")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        cells = (row["job"], "`{}`".format(row["swept"]) if row["swept"] else "", _status_cell(row),
                 _fmt(row["top1"]), _interval(row), _fmt(row["top5"]), _fmt(row["balanced_accuracy"]),
                 _fmt(row["best_top1"]), _fmt(row["steps"]),
                 _fmt(row["images_per_sec"], 1), _fmt(row["wall_sec"], 1), row["folder"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "![eval top-1 and training loss per job]({})".format(SUMMARY_PNG), ""]
    return "\n".join(lines)


def write_report(sweep_dir, figure=True):
    """Writes summary.csv, summary.md and (figure=True) summary.png into sweep_dir; returns the SweepReport."""
    report = collect(sweep_dir)
    run_folder.atomic_write_text(os.path.join(report.sweep_dir, SUMMARY_CSV), _csv_text(report.rows))
    run_folder.atomic_write_text(os.path.join(report.sweep_dir, SUMMARY_MD), _md_text(report))
    if figure:
        jobs = [("#{} {}{}".format(row["job"], _short(row["swept"] or row["overrides"]),
                                   "" if row["status"] == COMPLETED else " ({})".format(row["status"])), train, points)
                for row, (train, points) in zip(report.rows, report.jobs)]
        draw_sweep(os.path.join(report.sweep_dir, SUMMARY_PNG), report.sweep_dir, jobs)
    return report


def _short(text, limit=60):
    return text if len(text) <= limit else text[:limit - 3] + "..."
