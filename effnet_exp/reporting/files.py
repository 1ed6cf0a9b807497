"""Reading a run folder's result files tolerantly."""
import json
import os


def read_json(path):
    """The JSON object in path, or None when the file is missing or not (yet) valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError, ValueError):
        return None


def read_metrics(path):
    """metrics.jsonl's records; a torn last line (a killed run) is skipped, a missing file gives []."""
    records = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    except (IOError, OSError):
        return []
    return records


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
    final = read_json(os.path.join(run_dir, "eval.json"))
    if final and final.get("step") is not None and final.get("top1") is not None:
        points[final["step"]] = final["top1"]
    return sorted(points.items())
