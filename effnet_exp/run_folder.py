"""The one module that knows a run folder's layout, and writes its files whole or not at all.

<run folder>/
  .hydra/config.yaml, overrides.yaml      Hydra's record of the composed config (rewritten at every start)
  .hydra/effnet_config.yaml               the config of the first start, which resume= continues
  run.log, metrics.jsonl, curves.png      log, one JSON line per logged step or evaluation, the curves
  train_summary.json                      the training's images/s, ms/step, final loss, time (reporting/train_summary.py)
  labels.txt                              class names, one per line, in class-index order
  eval.json, predictions.json             results of the evaluation and of mode=predict
  confusion.csv, predictions.jsonl        the evaluation's confusion matrix and (eval.save_predictions) per-image
                                          results; confusion.png, reliability.png, mistakes.png its figures
  checkpoints/model.ckpt-N*, checkpoint   TensorFlow checkpoints and their state file (the chief writes them)
  checkpoints/best/                       the checkpoint with the best eval top-1 (train.eval_every)
  tensorboard/train, tensorboard/eval     TensorBoard events
  export/                                 mode=export
  profiling/, dump/                       device=ascend's profiles and dumps (device.profiling, device.dump)
  rank_<k>/ or worker_<k>/                what a data-parallel process other than the chief writes (its run.log,
                                          metrics.jsonl, curves.png); it resumes from checkpoints/ above
No TensorFlow import here.
"""
import codecs
import json
import os
import re
import tempfile

from omegaconf import OmegaConf

from effnet_exp.errors import UserError

HYDRA_DIR = ".hydra"
HYDRA_CONFIG = os.path.join(HYDRA_DIR, "config.yaml")
HYDRA_OVERRIDES = os.path.join(HYDRA_DIR, "overrides.yaml")
SAVED_CONFIG = os.path.join(HYDRA_DIR, "effnet_config.yaml")
METRICS = "metrics.jsonl"
LABELS = "labels.txt"
EVAL = "eval.json"
PREDICTIONS = "predictions.json"
CONFUSION_CSV = "confusion.csv"
EVAL_PREDICTIONS = "predictions.jsonl"
CONFUSION_PNG, RELIABILITY_PNG, MISTAKES_PNG = "confusion.png", "reliability.png", "mistakes.png"
CURVES = "curves.png"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "model.ckpt"
BEST_DIR = "best"
BEST_RECORD = "best.json"
TENSORBOARD = "tensorboard"
EXPORT_DIR = "export"


def metrics_path(folder):
    return os.path.join(folder, METRICS)


def eval_path(folder):
    return os.path.join(folder, EVAL)


def predictions_path(folder):
    return os.path.join(folder, PREDICTIONS)


def labels_path(folder):
    return os.path.join(folder, LABELS)


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR)


def checkpoint_prefix(run_dir):
    return os.path.join(run_dir, CHECKPOINT_DIR, CHECKPOINT_PREFIX)


def tensorboard_dir(run_dir, name):
    return os.path.join(run_dir, TENSORBOARD, name)


def process_dir(run_dir, placement):
    """Where this process writes: the run folder for the chief, else its own sub-folder (created)."""
    if placement.folder is None:
        return run_dir
    own = os.path.join(run_dir, placement.folder)
    if not os.path.isdir(own):
        os.makedirs(own)
    return own


# --- whole files --------------------------------------------------------------------------------------------

def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_jsonl(path, obj):
    """One whole line per call: a single write() of the complete line, flushed to disk."""
    line = json.dumps(obj, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


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
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # blank, or torn by a kill
    except (IOError, OSError):
        return []
    return records


def drop_records_after(path, step):
    """Rewrites a metrics file (atomically) without its records past `step`: after a crash, the steps
    since the last checkpoint are trained again and logged again. Returns how many were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line (a kill in the middle of a write): dropped too
        if int(record.get("step", 0)) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def write_labels(folder, class_names):
    atomic_write_text(labels_path(folder), "\n".join(class_names) + "\n")


# --- checkpoints --------------------------------------------------------------------------------------------

_LATEST = re.compile(r'^model_checkpoint_path:\s*"(.*)"\s*$', re.M)


def checkpoint_exists(prefix):
    """A V2 checkpoint (prefix.index) or a V1 one (a file at prefix itself)."""
    return os.path.isfile(prefix + ".index") or os.path.isfile(prefix)


def latest_checkpoint(folder):
    """The newest complete checkpoint prefix in folder according to its `checkpoint` state file, or None."""
    try:
        with open(os.path.join(folder, "checkpoint"), "rb") as f:
            found = _LATEST.search(f.read().decode("utf-8"))
    except (IOError, OSError):
        return None
    if not found:
        return None
    prefix = codecs.escape_decode(found.group(1).encode("utf-8"))[0].decode("utf-8")  # text-proto escapes
    prefix = prefix if os.path.isabs(prefix) else os.path.join(folder, prefix)
    return prefix if checkpoint_exists(prefix) else None


def resolve_checkpoint(path):
    """A checkpoint prefix from a prefix, a checkpoint folder or a run folder; UserError naming the path."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        for folder in (checkpoint_dir(path), path):
            prefix = latest_checkpoint(folder)
            if prefix:
                return prefix
        raise UserError("no checkpoint found in folder {} (looked for a `checkpoint` state file in it and "
                         "in its {}/ sub-folder)".format(path, CHECKPOINT_DIR))
    if checkpoint_exists(path):
        return path
    raise UserError("checkpoint {} does not exist (expected a prefix with {}.index beside it, "
                     "a checkpoint folder or a run folder)".format(path, os.path.basename(path)))


def run_folder_of(prefix):
    """The run folder holding a checkpoint prefix (<run>/checkpoints[/best]/model.ckpt-N), or None."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if os.path.basename(folder) == BEST_DIR:
        folder = os.path.dirname(folder)
    if os.path.basename(folder) != CHECKPOINT_DIR:
        return None
    run_dir = os.path.dirname(folder)
    return run_dir if os.path.isfile(os.path.join(run_dir, HYDRA_CONFIG)) else None


def saved_sections(run_dir):
    """(model, dataset) sections of the run's saved config, resolved, as plain dicts."""
    saved = OmegaConf.load(os.path.join(run_dir, HYDRA_CONFIG))
    return (OmegaConf.to_container(saved.model, resolve=True), OmegaConf.to_container(saved.dataset, resolve=True))


def read_class_names(path, num_classes, expected):
    """The names in a labels.txt (one a line, blank lines ignored); UserError naming the file when their count
    is not num_classes (0 or None: not checked). expected says where num_classes comes from, for the message."""
    with open(path) as f:
        names = [line.rstrip("\n") for line in f if line.strip()]
    if num_classes and len(names) != num_classes:
        raise UserError("{} has {} lines (class names) but {}: it needs one name a line, in class-index "
                        "order".format(path, len(names), expected))
    return names


def saved_class_names(run_dir, num_classes):
    """The run folder's class names, checked against the class count of its model; None without labels.txt."""
    path = labels_path(run_dir)
    if not os.path.isfile(path):
        return None
    expected = "the model trained in {} has {} classes".format(run_dir, num_classes)
    return read_class_names(path, num_classes, expected)
