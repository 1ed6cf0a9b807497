"""Is run B really better than run A? `python -m effnet_exp.tools.compare RUN_A RUN_B [--out DIR]`.

Both run folders must hold eval.json and predictions.jsonl (evaluated with eval.save_predictions=true) of the same
eval data: the same images, checked as the same count and the same sequence of sources and labels. Prints, and
writes to DIR/compare.md (default: the current folder, so neither run folder is changed): top-1 of each with its
95% interval, the difference B - A, McNemar's exact test on the per-image correctness, one line saying whether
the difference is significant at 5%, and the classes whose recall changed most. Exit status 2 on bad input
(one `error:` line; nothing written).
"""
import argparse
import collections
import json
import os
import sys

from effnet_exp import run_folder
from effnet_exp.errors import UserError

COMPARE_MD = "compare.md"
SIGNIFICANCE = 0.05
TOP_CLASSES = 10
PER_CLASS = ("index", "name", "support", "recall")  # the fields of eval.json's per_class entries used here

Run = collections.namedtuple("Run", "folder result sources labels correct")


# --- the test -------------------------------------------------------------------------------------------------

def binomial_tail(n, k):
    """P[X <= k] for X ~ Bin(n, 1/2), from exact integers: sum of C(n, i) for i <= k over 2**n, correctly
    rounded (Python's int / int). About (n * k) bit operations: ~0.1 s at n = 20000, k = n / 2."""
    term, total = 1, 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        total += term
    return total / (1 << n)


def mcnemar_p(b, c):
    """Two-sided exact McNemar p-value: b images only A got right, c only B; min(1, 2 P[X <= min(b, c)]) with
    X ~ Bin(b + c, 1/2), which is 1 when b + c = 0."""
    return min(1.0, 2 * binomial_tail(b + c, min(b, c)))


def disagreements(correct_a, correct_b):
    """(b, c): images A got right and B wrong, images A got wrong and B right."""
    b = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    c = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    return b, c


# --- reading and checking -------------------------------------------------------------------------------------

def _prediction(line, where):
    try:
        record = json.loads(line)
        return str(record["source"]), int(record["label"]), int(record["top5"][0]["index"]) == int(record["label"])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise UserError("{}: not a prediction record ({}: {}); expected {{\"index\", \"source\", \"label\", "
                        "\"top5\": [{{\"index\", \"probability\"}}, ...]}}".format(where, type(err).__name__, err))


def read_predictions(path):
    """(sources, labels, correct) of a predictions.jsonl, one entry per eval image in eval order."""
    sources, labels, correct = [], [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                source, label, right = _prediction(line, "{} line {}".format(path, number))
                sources.append(source)
                labels.append(label)
                correct.append(right)
    return sources, labels, correct


def _eval_result(folder):
    path = run_folder.eval_path(folder)
    if not os.path.isfile(path):
        raise UserError("{} has no {}: it is not an evaluated run folder".format(folder, run_folder.EVAL))
    result = run_folder.read_json(path)
    if not isinstance(result, dict):
        raise UserError("{} is not valid JSON".format(path))
    missing = [k for k in ("top1", "top1_ci95", "num_images", "per_class") if k not in result]
    missing += sorted({k for entry in result.get("per_class", []) for k in PER_CLASS if k not in entry})
    if missing:
        raise UserError("{} has no {}: evaluate the run again with this version".format(path, ", ".join(missing)))
    return result


def load_run(folder):
    """A run folder's eval.json and predictions.jsonl; UserError naming the folder or file at fault."""
    if not os.path.isdir(folder):
        raise UserError("{}: no such folder".format(folder))
    result = _eval_result(folder)
    path = os.path.join(folder, run_folder.EVAL_PREDICTIONS)
    if not os.path.isfile(path):
        raise UserError("{} has no {}: evaluate it with eval.save_predictions=true (python run.py mode=eval "
                        "eval.checkpoint={} eval.save_predictions=true) and compare that evaluation's run folder"
                        .format(folder, run_folder.EVAL_PREDICTIONS, folder))
    sources, labels, correct = read_predictions(path)
    if len(correct) != result["num_images"]:
        raise UserError("{} has {} lines but {} says num_images={}: they come from different evaluations".format(
            path, len(correct), run_folder.eval_path(folder), result["num_images"]))
    return Run(folder, result, sources, labels, correct)


def check_same_data(a, b):
    """UserError naming the first difference between the eval data of a and b: the number of images, the first
    image whose source differs, the first whose label differs, or the number of classes."""
    if len(a.sources) != len(b.sources):
        raise UserError("not the same eval data: {} has {} eval images, {} has {}".format(
            a.folder, len(a.sources), b.folder, len(b.sources)))
    for index, (source_a, source_b) in enumerate(zip(a.sources, b.sources)):
        if source_a != source_b:
            raise UserError("not the same eval data: eval image {} is {!r} in {} but {!r} in {}".format(
                index, source_a, a.folder, source_b, b.folder))
    for index, (label_a, label_b) in enumerate(zip(a.labels, b.labels)):
        if label_a != label_b:
            raise UserError("not the same eval data: eval image {} ({!r}) has label {} in {} but {} in {}".format(
                index, a.sources[index], label_a, a.folder, label_b, b.folder))
    if len(a.result["per_class"]) != len(b.result["per_class"]):
        raise UserError("not the same classes: {} has {}, {} has {}".format(
            run_folder.eval_path(a.folder), len(a.result["per_class"]), run_folder.eval_path(b.folder),
            len(b.result["per_class"])))


# --- the report -----------------------------------------------------------------------------------------------

def recall_changes(a, b, n=TOP_CLASSES):
    """[(index, name, support, recall A, recall B)] of the n classes whose recall changed most (B - A, by
    absolute value, ties by class index); unchanged classes are left out."""
    pairs = zip(a.result["per_class"], b.result["per_class"])
    rows = [(ca["index"], ca["name"], ca["support"], ca["recall"], cb["recall"]) for ca, cb in pairs
            if None not in (ca["recall"], cb["recall"]) and cb["recall"] != ca["recall"]]  # None: no support
    return sorted(rows, key=lambda row: (-abs(row[4] - row[3]), row[0]))[:n]


def verdict(p):
    return "The difference is {}significant at 5% (p = {:.4g})".format("" if p < SIGNIFICANCE else "not ", p)


def _run_row(name, run):
    low, high = run.result["top1_ci95"]
    return "| {} | {:.4f} | [{:.4f}, {:.4f}] | {} | {} |".format(
        name, run.result["top1"], low, high, run.result["num_images"], os.path.abspath(run.folder))


def report(a, b):
    """compare.md's text."""
    b_only, c_only = disagreements(a.correct, b.correct)
    p = mcnemar_p(b_only, c_only)
    lines = ["# Run B against run A", "",
             "| run | top-1 | 95% interval | images | folder |", "|---|---|---|---|---|",
             _run_row("A", a), _run_row("B", b), "",
             "B - A: {:+.4f} top-1 ({:+d} images right)".format(
                 b.result["top1"] - a.result["top1"], c_only - b_only), "",
             "McNemar's exact test over the {} images: A right and B wrong b = {}, A wrong and B right c = {}, "
             "p = {:.4g}".format(len(a.correct), b_only, c_only, p), "",
             verdict(p), "", "## The classes whose recall changed most", ""]
    changes = recall_changes(a, b)
    if not changes:
        return "\n".join(lines + ["No class's recall changed.", ""])
    lines += ["| class | name | support | recall A | recall B | change |", "|---|---|---|---|---|---|"]
    lines += ["| {} | {} | {} | {:.4f} | {:.4f} | {:+.4f} |".format(index, name, support, ra, rb, rb - ra)
              for index, name, support, ra, rb in changes]
    return "\n".join(lines + [""])


def compare(folder_a, folder_b, out):
    """Checks both runs, writes out/compare.md; returns (its path, its text)."""
    a, b = load_run(folder_a), load_run(folder_b)
    check_same_data(a, b)
    text = report(a, b)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError("--out {} is a file, not a folder".format(out))
    if not os.path.isdir(out):
        os.makedirs(out)
    path = os.path.join(out, COMPARE_MD)
    run_folder.atomic_write_text(path, text)
    return path, text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m effnet_exp.tools.compare", description=__doc__.split("\n")[0])
    parser.add_argument("run_a", help="the run folder to compare against (A)")
    parser.add_argument("run_b", help="the other run folder (B); differences are B - A")
    parser.add_argument("--out", default=".", help="folder for compare.md (default: the current folder)")
    args = parser.parse_args(argv)
    try:
        path, text = compare(args.run_a, args.run_b, args.out)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    sys.stdout.write(text)
    print("wrote {}".format(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
