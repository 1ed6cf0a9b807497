"""The training and evaluation points of a run folder's result files."""
from effnet_exp import run_folder


def split_metrics(records):
    """(training records, eval records) by step; for a step logged twice (a resumed run), the later one."""
    train, evals = {}, {}
    for record in records:
        if "step" not in record:
            continue
        if "eval_top1" in record:
            evals[record["step"]] = record
        elif "loss" in record or "top1" in record:
            train[record["step"]] = record
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def eval_points(run_dir, eval_records):
    """[(step, eval top-1)] from the periodic evaluations plus the final eval.json."""
    points = {r["step"]: r["eval_top1"] for r in eval_records if r.get("eval_top1") is not None}
    final = run_folder.read_json(run_folder.eval_path(run_dir))
    if final and final.get("step") is not None and final.get("top1") is not None:
        points[final["step"]] = final["top1"]
    return sorted(points.items())
