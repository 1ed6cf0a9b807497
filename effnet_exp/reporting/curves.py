"""curves.png in a run folder, drawn from its metrics.jsonl and eval.json (at each evaluation and at the end)."""
import logging
import os

from effnet_exp import run_folder
from effnet_exp.reporting.files import eval_points, split_metrics
from effnet_exp.reporting.plots import draw_run_curves

log = logging.getLogger(__name__)


def draw_curves(run_dir):
    """Redraws <run_dir>/curves.png; returns its path. Raises what matplotlib or the disk raise."""
    train, evals = split_metrics(run_folder.read_metrics(run_folder.metrics_path(run_dir)))
    path = os.path.join(run_dir, run_folder.CURVES)
    draw_run_curves(path, os.path.abspath(run_dir), train, eval_points(run_dir, evals))
    return path


def update_curves(run_dir):
    """draw_curves for the training loop: a figure that cannot be drawn is logged, never stops the run."""
    try:
        return draw_curves(run_dir)
    except Exception as err:  # matplotlib missing or broken, disk full: the training result matters more
        log.warning("could not draw %s: %s: %s", os.path.join(run_dir, run_folder.CURVES), type(err).__name__, err)
        return None
