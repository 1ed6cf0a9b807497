"""Typed schema of the `export` section and its checks (no TensorFlow import here)."""
import enum
import re
from dataclasses import dataclass, field
from typing import List, Optional

from effnet_exp.errors import UserError


class ExportFormat(str, enum.Enum):
    frozen_pb = "frozen_pb"  # model.pb (what ATC compiles)
    saved_model = "saved_model"  # saved_model/
    tflite = "tflite"  # model.tflite / model_<quantize>.tflite, one per export.quantize
    all = "all"  # all three


class Quantize(str, enum.Enum):
    none = "none"  # float32 weights and activations: model.tflite
    fp16 = "fp16"  # float16 weights, float computation: model_fp16.tflite
    dynamic = "dynamic"  # int8 weights, float activations (dynamic-range quantization): model_dynamic.tflite
    int8 = "int8"  # full integer: int8 weights and activations, calibrated on export.calibration_images


class Int8IO(str, enum.Enum):
    float = "float"  # int8 inside, float32 input and outputs (quantize / dequantize ops at the ends)
    uint8 = "uint8"  # uint8 input and outputs (scale and zero point in export.json)
    int8 = "int8"  # int8 input and outputs


@dataclass
class ExportConfig:
    format: ExportFormat = ExportFormat.frozen_pb
    # The input's batch dimension: None exports it dynamic (-1), N fixes it (what ATC compiles for).
    batch_size: Optional[int] = None
    # The checkpoint's /ExponentialMovingAverage shadows when it has them; false takes the raw weights.
    use_ema: bool = True
    # Also a graph taking a batch of JPEG/PNG bytes (`image_bytes`) with the eval preprocessing inside:
    # model_image_bytes.pb, and an `image_bytes` signature in the SavedModel.
    image_bytes_graph: bool = False
    # false: `input` takes normalised images (see export.json); true: 0-255 RGB, normalised in the graph.
    normalize_in_graph: bool = False
    # The Ascend chips export.json (and the end of the run) gives an `atc` command line for.
    soc_versions: List[str] = field(default_factory=lambda: ["Ascend310", "Ascend910"])
    # TFLite (export.format=tflite or all): one file per entry.
    quantize: List[Quantize] = field(default_factory=lambda: [Quantize.none])
    # int8: this many images of the dataset's training split (eval preprocessing, seeded) calibrate the ranges.
    calibration_images: int = 500
    int8_io: Int8IO = Int8IO.float
    # The export report (also `python -m effnet_exp.tools.export_report RUN`): export/report.md + report.json.
    report: bool = False
    report_images: Optional[int] = None  # null: the whole eval split; N: its first N images
    report_runs: int = 50  # batch-1 latency: timed runs after warm-up
    max_top1_drop: float = 0.02  # a quantized artifact losing more top-1 than this against the checkpoint is flagged


TFLITE_FORMATS = (ExportFormat.tflite, ExportFormat.all)


def tflite_name(quantize):
    """model.tflite for the float model, model_<quantize>.tflite for the others."""
    quantize = Quantize(quantize)
    return "model.tflite" if quantize == Quantize.none else "model_{}.tflite".format(quantize.value)


def wants_int8(cfg):
    return ExportFormat(cfg.format) in TFLITE_FORMATS and Quantize.int8 in [Quantize(q) for q in cfg.quantize]


def needs_data(cfg):
    """Whether the export reads the dataset: int8 calibration, or the report's evaluation."""
    return bool(cfg.report) or wants_int8(cfg)


_SOC = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_export(cfg):
    """UserError naming the export.* key and value that cannot work."""
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError("export.batch_size={} must be at least 1, or null for a dynamic batch".format(
            cfg.batch_size))
    for soc in cfg.soc_versions:
        if not isinstance(soc, str) or not _SOC.match(soc):
            raise UserError("export.soc_versions has {!r}: expected names such as Ascend310, Ascend910".format(soc))
    if len(set(Quantize(q) for q in cfg.quantize)) != len(cfg.quantize) or not cfg.quantize:
        raise UserError("export.quantize={} must list each of {} at most once, and at least one".format(
            [Quantize(q).value for q in cfg.quantize], ", ".join(q.value for q in Quantize)))
    if cfg.calibration_images < 1:
        raise UserError("export.calibration_images={} must be at least 1".format(cfg.calibration_images))
    if cfg.report_images is not None and cfg.report_images < 1:
        raise UserError("export.report_images={} must be at least 1, or null for the whole eval split".format(
            cfg.report_images))
    if cfg.report_runs < 1:
        raise UserError("export.report_runs={} must be at least 1".format(cfg.report_runs))
    if not 0 <= cfg.max_top1_drop <= 1:
        raise UserError("export.max_top1_drop={} must be between 0 and 1".format(cfg.max_top1_drop))
    return cfg
