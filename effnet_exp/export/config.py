"""Typed schema of the `export` section and its checks (no TensorFlow import here)."""
import enum
import re
from dataclasses import dataclass, field
from typing import List, Optional

from effnet_exp.errors import UserError


class ExportFormat(str, enum.Enum):
    frozen_pb = "frozen_pb"  # model.pb (what ATC compiles)
    saved_model = "saved_model"  # saved_model/
    all = "all"  # both


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


_SOC = re.compile(r"^[A-Za-z0-9_.-]+$")


def check_export(cfg):
    """UserError naming the export.* key and value that cannot work."""
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise UserError("export.batch_size={} must be at least 1, or null for a dynamic batch".format(
            cfg.batch_size))
    for soc in cfg.soc_versions:
        if not isinstance(soc, str) or not _SOC.match(soc):
            raise UserError("export.soc_versions has {!r}: expected names such as Ascend310, Ascend910".format(soc))
    return cfg
