"""curves.png in a run folder, drawn from its metrics.jsonl and eval.json (at each evaluation and at the end)."""
import os

from effnet_exp import run_folder
from effnet_exp.reporting import drawing
from effnet_exp.reporting.files import eval_points, split_metrics
from effnet_exp.reporting.plots import draw_run_curves


def update_curves(run_dir):
    """Redraws <run_dir>/curves.png in the background (reporting.drawing) from the records as they are now: a
    figure that cannot be drawn is logged, never stops the run."""
    train, evals = split_metrics(run_folder.read_metrics(run_folder.metrics_path(run_dir)))
    path = os.path.join(run_dir, run_folder.CURVES)
    drawing.submit(path, draw_run_curves, path, os.path.abspath(run_dir), train, eval_points(run_dir, evals))
