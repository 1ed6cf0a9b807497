"""The export report: a row per artifact of a run's export/ (the checkpoint, model.pb, saved_model/, each
.tflite) with its size, its top-1 / top-5 on the eval split (or its first export.report_images), the
difference to the checkpoint and its batch-1 latency; export/report.md + report.json, written atomically."""
import json
import logging
import os
import time

import numpy as np
import tensorflow as tf

from effnet_exp.devices.base import Purpose
from effnet_exp.errors import UserError
from effnet_exp.export.calibration import read_images
from effnet_exp.export.exporter import EXPORT_DIR, FROZEN_PB, MANIFEST, SAVED_MODEL_DIR
from effnet_exp.inference.artifacts import CHECKPOINT, CheckpointModel, TFLiteModel, open_model
from effnet_exp.run_folder import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
WARMUP_RUNS = 5
EVAL_BATCH = 64


def export_manifest(run_dir):
    path = os.path.join(run_dir, EXPORT_DIR, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError, ValueError) as err:
        raise UserError("cannot read {} ({}): export the run first (mode=export)".format(
            path, getattr(err, "strerror", None) or err))


def artifact_paths(run_dir, manifest):
    """[(row name, path, quantize)]: the checkpoint, then every exported file export.json lists."""
    folder = os.path.join(run_dir, EXPORT_DIR)
    files = manifest["files"]
    rows = [(CHECKPOINT, manifest["checkpoint"], None)]
    if "frozen_pb" in files:
        rows.append((FROZEN_PB, os.path.join(folder, FROZEN_PB), None))
    if "saved_model" in files:
        rows.append((SAVED_MODEL_DIR + "/", os.path.join(folder, SAVED_MODEL_DIR), None))
    rows.extend((entry["path"], os.path.join(folder, entry["path"]), entry["quantize"])
                for entry in files.get("tflite", []))
    return rows


def disk_size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(p) for p in tf.io.gfile.glob(path + ".*"))  # a checkpoint prefix's files


def _measure(model, images, labels, runs, session_config, latency_batch):
    """(top-1 indices [N], top-5 hits, latencies in ms of runs on latency_batch images, threads) of one
    artifact."""
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, [None] + list(images.shape[1:]))
        log_p = model.log_probabilities(x)
        k = min(5, int(log_p.shape[-1]))
        _, top = tf.nn.top_k(log_p, k=k)
    graph.finalize()
    with tf.compat.v1.Session(graph=graph, config=session_config) as sess:
        model.restore(sess)
        tops = [sess.run(top, {x: images[i:i + EVAL_BATCH]}) for i in range(0, len(images), EVAL_BATCH)]
        one = images[:latency_batch]
        if isinstance(model, TFLiteModel):  # the interpreter alone, as on a device
            runner = model.runner
            runner.set_input(np.asarray(one, np.float32) if not model.manifest["normalization"].get("in_graph")
                             else _pixels(one, model.manifest["normalization"]))

            def step():
                runner.invoke()
            threads = runner.threads
        else:
            def step():
                sess.run(log_p, {x: one})
            threads = session_config.intra_op_parallelism_threads if session_config is not None else 0
        latencies = _timed(step, runs)
    top = np.concatenate(tops)
    hits5 = np.any(top == labels[:, None], axis=1)
    return top[:, 0], hits5, latencies, threads or None


def _pixels(images, norm):
    return images * np.asarray(norm["std"], np.float32) + np.asarray(norm["mean"], np.float32)


def _timed(step, runs):
    for _ in range(WARMUP_RUNS):
        step()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def build_report(run_dir, model_cfg, use_ema, source, ds_cfg, image_size, normalization, export_cfg, threads,
                 session_config):
    """Measures every artifact of run_dir/export/; writes report.md and report.json there; returns the report."""
    manifest = export_manifest(run_dir)
    if int(manifest["num_classes"]) != int(source.num_classes or ds_cfg.num_classes or manifest["num_classes"]):
        raise UserError("the export's model has {} classes but the dataset {} has {}: the report evaluates on "
                        "the dataset of the run (dataset=...)".format(manifest["num_classes"], source.data_dir,
                                                                      source.num_classes))
    images, labels = read_images(source, ds_cfg, image_size, normalization, limit=export_cfg.report_images)
    if not len(images):
        raise UserError("no eval images in {} for the export report".format(source.data_dir))
    latency_batch = int(manifest.get("batch_size") or 1)
    if len(images) < latency_batch:
        raise UserError("the export's batch is {} but the report has {} eval images".format(latency_batch,
                                                                                           len(images)))
    rows = _measured_rows(run_dir, manifest, images, labels, model_cfg, use_ema, export_cfg, threads,
                          session_config, latency_batch)
    drop = float(export_cfg.max_top1_drop)
    _flag(rows, drop)
    report = {"export_dir": os.path.join(run_dir, EXPORT_DIR), "num_images": int(len(labels)),
              "latency_batch": latency_batch, "warmup_runs": WARMUP_RUNS, "runs": int(export_cfg.report_runs),
              "max_top1_drop": drop, "tensorflow_version": tf.__version__, "rows": rows}
    folder = os.path.join(run_dir, EXPORT_DIR)
    atomic_write_json(os.path.join(folder, REPORT_JSON), report)
    atomic_write_text(os.path.join(folder, REPORT_MD), report_markdown(report))
    return report


def _measured_rows(run_dir, manifest, images, labels, model_cfg, use_ema, export_cfg, threads, session_config,
                   latency_batch):
    rows = []
    reference = None
    for name, path, quantize in artifact_paths(run_dir, manifest):
        model = CheckpointModel(path, model_cfg, use_ema) if name == CHECKPOINT else open_model(path,
                                                                                               threads=threads)
        log.info("export report: %s", name)
        top1, hits5, latencies, used = _measure(model, images, labels, export_cfg.report_runs, session_config,
                                                latency_batch)
        if reference is None:
            reference = top1
        fmt = model.format + (" " + quantize if quantize else "")
        rows.append(_row(name, fmt, path, top1, hits5, labels, reference, latencies, used))
    return rows


def _flag(rows, drop):
    """Each row's top-1 difference to the checkpoint (the first row); flagged when it loses more than drop."""
    for row in rows:
        row["top1_diff"] = row["top1"] - rows[0]["top1"]
        row["flagged"] = row["name"] != CHECKPOINT and -row["top1_diff"] > drop
        if row["flagged"]:
            log.warning("export report: %s loses %.4f top-1 against the checkpoint (more than export.max_top1_drop"
                        "=%g)", row["name"], -row["top1_diff"], drop)


def report_of_spec(spec):
    """build_report for a RunSpec of mode=export whose run folder holds the export."""
    return build_report(spec.run_dir, spec.model, spec.use_ema, spec.source, spec.cfg.dataset, spec.image_size,
                        spec.normalization, spec.cfg.export, spec.cfg.device.intra_op_threads,
                        spec.device.session_config(Purpose.INFERENCE))


def _row(name, fmt, path, top1, hits5, labels, reference, latencies, threads):
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99])
    return {"name": name, "format": fmt, "path": path, "size_bytes": int(disk_size(path)),
            "top1": float(np.mean(top1 == labels)), "top5": float(np.mean(hits5)),
            "top1_agreement": float(np.mean(top1 == reference)),
            "latency_ms": {"p50": float(p50), "p90": float(p90), "p99": float(p99)},
            "threads": threads}


def report_markdown(report):
    lines = ["# Export report", "",
             "{} eval images; batch-{} latency over {} runs after {} warm-up runs; TensorFlow {}.".format(
                 report["num_images"], report["latency_batch"], report["runs"], report["warmup_runs"],
                 report["tensorflow_version"]), "",
             "| artifact | format | size (MB) | top-1 | top-5 | top-1 vs checkpoint | agrees with checkpoint | "
             "p50 ms | p90 ms | p99 ms | threads | flag |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lat = row["latency_ms"]
        lines.append(("| {} | {} | {:.2f} | {:.4f} | {:.4f} | {:+.4f} | {:.4f} | {:.2f} | {:.2f} | {:.2f} | {} | {} |"
                      ).format(row["name"], row["format"], row["size_bytes"] / 1e6, row["top1"], row["top5"], row["top1_diff"],
            row["top1_agreement"], lat["p50"], lat["p90"], lat["p99"], row["threads"] or "default",
            "loses more than {:g}".format(report["max_top1_drop"]) if row["flagged"] else ""))
    return "\n".join(lines) + "\n"
