"""Where a run's records come from: resolves dataset config to files and counts, before any graph."""
import json
import logging
import os
from collections import namedtuple

import tensorflow as tf

from effnet_exp.data.bundled import prepare_builtin
from effnet_exp.data.config import LABELS_FILE, MANIFEST
from effnet_exp.data.diagnostics import SKIP_HINT, describe_bad_record, label_message
from effnet_exp.data.folder import scan_image_folder
from effnet_exp.data.records import count_records, inspect_payload, list_files
from effnet_exp.errors import UserError
from effnet_exp.run_folder import read_class_names

log = logging.getLogger(__name__)

DataSource = namedtuple(
    "DataSource",
    "data_dir train_files eval_files num_train num_eval class_names kind train_items eval_items num_classes",
    defaults=("tfrecord", None, None, None))
DataSource.__doc__ = """What resolve_data_source found.

data_dir: the TFRecord folder (or the image folder's root); train_files / eval_files: the TFRecord
files (image files for an image folder); num_train / num_eval: record counts; class_names: list or
None; kind: "tfrecord" or "folder"; train_items / eval_items: [(image path, label)] for an image
folder, else None; num_classes: what the data says (class folders, manifest.json), else None.
Pass it to pipeline.build_dataset."""


def resolve_data_source(ds_cfg, need_train=True, need_eval=True):
    """Resolve ds_cfg to a DataSource, raising UserError for anything wrong with the data or config:
    missing or empty folders, class folders without images, num_classes or label_offset disagreeing
    with the data, labels out of range, bad records found by the precheck (unless skip_bad_records)."""
    if ds_cfg.root:
        return _resolve_folder(ds_cfg, need_train, need_eval)
    class_names = None
    data_num_classes = None
    num_train, num_eval = ds_cfg.num_train_images, ds_cfg.num_eval_images
    if ds_cfg.builtin:
        info = prepare_builtin(ds_cfg.builtin.value, ds_cfg.cache_dir)
        data_dir = info["data_dir"]
        class_names = list(info["class_names"])
        data_num_classes = info["num_classes"]
        num_train = num_train or info["num_train"]
        num_eval = num_eval or info["num_eval"]
        if info["num_classes"] != ds_cfg.num_classes and ds_cfg.num_classes:
            raise UserError("dataset.num_classes={} but the built-in dataset {!r} has {} classes".format(
                ds_cfg.num_classes, ds_cfg.builtin.value, info["num_classes"]))
    else:
        if not ds_cfg.data_dir:
            raise UserError("dataset.data_dir is not set (the folder holding the TFRecord shards)")
        data_dir = ds_cfg.data_dir
        if "://" not in data_dir:  # gs://, hdfs://, obs:// paths are left to tf.io.gfile
            data_dir = os.path.abspath(os.path.expanduser(data_dir))
        if "://" not in data_dir and not os.path.isdir(data_dir):
            raise UserError("dataset.data_dir={} does not exist or is not a folder".format(data_dir))
        class_names, data_num_classes = _check_manifest(ds_cfg, data_dir)
    num_classes = ds_cfg.num_classes or data_num_classes
    if not num_classes:
        raise UserError("dataset.num_classes=0 (take it from the data) but {} has no {} saying how many "
                        "classes there are: set dataset.num_classes".format(data_dir, MANIFEST))
    try:
        train_files = list_files(data_dir, ds_cfg.train_pattern) if need_train else []
        eval_files = list_files(data_dir, ds_cfg.eval_pattern) if need_eval else []
    except (IOError, OSError) as err:  # FileNotFoundError on Python 3
        raise UserError(str(err))
    if not ds_cfg.builtin:
        counts = _precheck(ds_cfg, num_classes, train_files + eval_files)
        if counts is not None:
            num_train = num_train or sum(counts[f] for f in train_files)
            num_eval = num_eval or sum(counts[f] for f in eval_files)
    try:
        if need_train and not num_train:
            num_train = count_records(train_files)
        if need_eval and not num_eval:
            num_eval = count_records(eval_files)
    except ValueError as err:  # a truncated file
        raise UserError("{} (set dataset.skip_bad_records=true and dataset.num_train_images / "
                        "num_eval_images to read what can be read)".format(err))
    _check_not_empty("training", train_files, num_train)
    _check_not_empty("validation", eval_files, num_eval)
    return DataSource(data_dir, train_files, eval_files, num_train, num_eval, class_names,
                      "tfrecord", None, None, num_classes)


def train_class_counts(source, ds_cfg, num_classes):
    """(images per class of the training split, where the counts come from): an image folder's file list, else the
    TFRecord folder's manifest.json when it lists per-class counts for exactly these training files, else one pass
    over the training records (logged; bad records and labels out of range are not counted)."""
    counts = [0] * num_classes
    if source.kind == "folder":
        for _, label in source.train_items:
            counts[label] += 1
        return counts, "the image folder's file list"
    listed = _manifest_counts(source.data_dir, source.train_files, num_classes)
    if listed is not None:
        return listed, os.path.join(source.data_dir, MANIFEST)
    log.info("counting the labels of the training records (no per-class counts for these files in %s): one "
             "pass over %s", MANIFEST, files_text(source.train_files))
    for path in source.train_files:
        try:
            for payload in tf.compat.v1.io.tf_record_iterator(path):
                label, _ = inspect_payload(payload, ds_cfg)
                if label is not None and 0 <= label < num_classes:
                    counts[label] += 1
        except tf.errors.OpError:  # a broken file: its readable records are counted
            pass
    return counts, "a pass over the training records"


def _manifest_counts(data_dir, train_files, num_classes):
    """The manifest's per-class counts of the split made of exactly train_files, by class index; else None."""
    path = os.path.join(data_dir, MANIFEST)
    if "://" in data_dir or not os.path.isfile(path):
        return None
    with open(path) as handle:
        manifest = json.load(handle)
    names = manifest.get("class_names") or []
    files = set(os.path.basename(f) for f in train_files)
    for split in manifest.get("splits", {}).values():
        per_class = split.get("per_class") or {}
        if set(split.get("files", [])) == files and len(names) == num_classes and set(per_class) == set(names):
            return [int(per_class[name]) for name in names]
    return None


def files_text(files):
    """The first three of files, and how many there are, for a message."""
    return ", ".join(files[:3]) + (", ... ({} files)".format(len(files)) if len(files) > 3 else "")


def _check_not_empty(split, files, count):
    """A split's files that hold no record at all stop the run before any graph (and any checkpoint)."""
    if files and count == 0:
        raise UserError("the {} split has no records: {} {} empty".format(
            split, files_text(files), "is" if len(files) == 1 else "are all"))


def _check_manifest(ds_cfg, data_dir):
    """(class names or None, num_classes or None) from data_dir's manifest.json / labels.txt, checked
    against dataset.num_classes and dataset.label_offset."""
    if "://" in data_dir:
        return None, None
    manifest_path = os.path.join(data_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as handle:
                manifest = json.load(handle)
            num_classes = int(manifest["num_classes"])
            offset = int(manifest.get("label_offset", 0))
            names = manifest.get("class_names")
        except (ValueError, KeyError, TypeError) as err:
            raise UserError("{} is not a valid dataset manifest ({})".format(manifest_path, err))
        if ds_cfg.num_classes and ds_cfg.num_classes != num_classes:
            raise UserError("dataset.num_classes={} but {} says the data has {} classes".format(
                ds_cfg.num_classes, manifest_path, num_classes))
        if int(ds_cfg.label_offset) != offset:
            raise UserError("dataset.label_offset={} but {} says the labels were written with offset {}"
                            .format(ds_cfg.label_offset, manifest_path, offset))
        if names is not None and len(names) != num_classes:
            names = None
        return (list(names) if names else None), num_classes
    labels_path = os.path.join(data_dir, LABELS_FILE)
    if os.path.isfile(labels_path) and ds_cfg.num_classes:
        return read_class_names(labels_path, ds_cfg.num_classes,
                                "dataset.num_classes={}".format(ds_cfg.num_classes)), None
    return None, None


def _precheck(ds_cfg, num_classes, files):
    """Read every record of small local TFRecord datasets once -> {file: record count}, or None
    when skipped (remote files, or more than dataset.precheck_max_mb). Raises UserError for a label
    out of range, and for any bad record unless dataset.skip_bad_records."""
    limit_mb = ds_cfg.precheck_max_mb
    files = sorted(set(files))
    if limit_mb <= 0 or not files or any("://" in f for f in files):
        return None
    if sum(os.path.getsize(f) for f in files) > limit_mb * 1024 * 1024:
        return None
    skip = ds_cfg.skip_bad_records
    counts, bad, labels_seen = {}, 0, set()

    def problem(message):
        if not skip:
            raise UserError("{} ({})".format(message, SKIP_HINT))
        if bad <= 20:
            log.warning("bad data (will be skipped): %s", message)

    for path in files:
        count = 0  # records, bad ones included (a truncated tail counts as one), as the pipeline counts them
        index = -1
        iterator = iter(tf.compat.v1.io.tf_record_iterator(path))
        while True:
            index += 1
            try:
                payload = next(iterator)
            except StopIteration:
                break
            except tf.errors.OpError:
                bad += 1
                count += 1
                problem(describe_bad_record("broken", path, index, ds_cfg))
                break
            label, reason = inspect_payload(payload, ds_cfg)
            if label is not None and not 0 <= label < num_classes:
                raise UserError(label_message(index, path, label, ds_cfg, num_classes))
            count += 1
            if reason is not None:
                bad += 1
                problem("record {} of {}: {}".format(index, path, reason))
                continue
            labels_seen.add(label)
        counts[path] = count
    if bad:
        log.warning("%d bad record(s) in %s: they will be skipped", bad, os.path.dirname(files[0]))
    if labels_seen and max(labels_seen) + 1 < num_classes // 2:
        log.warning("the labels in %s only span [0, %d] but dataset.num_classes=%d",
                    os.path.dirname(files[0]), max(labels_seen), num_classes)
    return counts


def _resolve_folder(ds_cfg, need_train, need_eval):
    split = scan_image_folder(ds_cfg.root, ds_cfg.val_fraction, ds_cfg.split_seed, what="dataset.root")
    num_classes = len(split.class_names)
    if ds_cfg.num_classes and ds_cfg.num_classes != num_classes:
        shown = ", ".join(split.class_names[:5]) + (", ..." if num_classes > 5 else "")
        raise UserError("dataset.num_classes={} but dataset.root={} has {} class folders ({}); set "
                        "dataset.num_classes={} or 0 (take it from the folders)".format(
                            ds_cfg.num_classes, split.root, num_classes, shown, num_classes))
    if need_train and not split.train:
        raise UserError("dataset.root={}: no training images".format(split.root))
    if need_eval and not split.val:
        raise UserError("dataset.root={}: no validation images: add a val/ tree next to train/, or set "
                        "dataset.val_fraction above 0 (it is {})".format(split.root, ds_cfg.val_fraction))
    how = {"split": "train/ and val/ trees",
           "train_only": "train/ tree, {:g} held out with seed {}".format(ds_cfg.val_fraction,
                                                                           ds_cfg.split_seed),
           "classes": "{:g} held out with seed {}".format(ds_cfg.val_fraction, ds_cfg.split_seed)}
    log.info("image folder %s: %d classes, %d training and %d validation images (%s)%s", split.root,
             num_classes, len(split.train), len(split.val), how[split.layout],
             "; {} non-image files ignored".format(split.ignored) if split.ignored else "")
    return DataSource(split.root, [p for p, _ in split.train], [p for p, _ in split.val],
                      len(split.train), len(split.val), list(split.class_names), "folder",
                      list(split.train), list(split.val), num_classes)
