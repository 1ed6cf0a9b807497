"""Convert an image folder into sharded TFRecords in the TF-Slim / TPU ImageNet format.

    python -m effnet_exp.tools.make_tfrecords --src DIR --out DIR [--val-fraction F] [--shards N]
        [--val-shards N] [--workers N] [--seed S] [--label-offset K] [--quality Q]

The folder layout, class order and validation split are those of `dataset=image_folder` (see
effnet_exp/data/folder.py): with the same fraction and seed both hold out the same images. Output, read
by `dataset=tfrecord dataset.data_dir=OUT` (train-* and validation-*, label offset as chosen):

    train-00000-of-0000N ...        validation-00000-of-0000M ...
    labels.txt                      class names, one a line, in label order
    manifest.json                   counts per split and class, shard names, skipped files; written last

Each record holds image/encoded, image/format ("JPEG"), image/class/label (class index + offset),
image/class/text, image/height, image/width and image/filename (path relative to --src). RGB JPEGs are
stored as they are; PNGs and greyscale or CMYK JPEGs are re-encoded as RGB JPEG. Records are shuffled
across shards with the seed. Images that cannot be read or decoded are reported by path on stderr, left
out and listed in the manifest; the conversion goes on.

The same input gives byte-identical output, whatever --workers. Every shard is written under a hidden
temporary name and renamed when complete, so an interrupted conversion never leaves a shard that looks
complete but is not (nor a manifest). The next conversion into the same folder removes the hidden
temporary files that a killed one left.
"""
import argparse
import io
import json
import multiprocessing
import os
import re
import sys
import tempfile
import time

import numpy as np

from effnet_exp.data.config import LABELS_FILE, MANIFEST
from effnet_exp.data.folder import image_problem, scan_image_folder, sniff_image_format
from effnet_exp.errors import UserError
from effnet_exp.optional import pil_image

SPLITS = (("train", "train"), ("validation", "val"))
DEFAULT_QUALITY = 95
_CHUNK = 16  # images per worker task


# --------------------------------------------------------------------------- one image (worker side)


def _pil_image():
    return pil_image("make_tfrecords")


def _to_rgb(image):
    Image = _pil_image()

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image).astype(np.int64)
        # 16-bit greyscale -> 8 bit, as TensorFlow's decode_png does.
        image = Image.fromarray(np.clip(pixels // 257, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def load_image(path, quality=DEFAULT_QUALITY):
    """(JPEG bytes, height, width, re-encoded?) for one image file; raises ValueError saying what is wrong.

    RGB JPEGs come back as they are, after a full decode to check them; PNGs and other JPEGs
    (greyscale, CMYK) are converted to RGB and encoded as JPEG at `quality`.
    """
    Image = _pil_image()
    with open(path, "rb") as handle:
        data = handle.read()
    problem = image_problem(data)  # before Pillow reads more than the header
    if problem:
        raise ValueError(problem)
    fmt = sniff_image_format(data)
    if fmt not in ("jpeg", "png"):
        raise ValueError("not a JPEG or PNG image ({})".format(
            "it is {} data".format(fmt.upper()) if fmt else "unrecognised data"))
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a full decode: truncated or corrupt data fails here
            width, height = image.size
            if fmt == "jpeg" and image.mode == "RGB":
                return data, height, width, False
            out = io.BytesIO()
            _to_rgb(image).save(out, "JPEG", quality=int(quality))
            return out.getvalue(), height, width, True
    except Image.DecompressionBombError as err:  # a size our header check did not find
        raise ValueError("{} (Pillow's limit: Image.MAX_IMAGE_PIXELS)".format(err))
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... for bad data
        # Without object addresses ("<_io.BytesIO object at 0x...>"): the manifest must not vary by run.
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(err)).strip() or type(err).__name__
        raise ValueError("its {} data cannot be decoded ({})".format(fmt.upper(), detail))


def _load_chunk(task):
    """Worker: [(index, path)] -> [(index, (bytes, height, width, reencoded) or None, problem or None)]."""
    items, quality = task
    results = []
    for index, path in items:
        try:
            results.append((index, load_image(path, quality), None))
        except (IOError, OSError) as err:
            results.append((index, None, "cannot be read ({})".format(err.strerror or err)))
        except ValueError as err:
            results.append((index, None, str(err)))
    return results


# --------------------------------------------------------------------------- progress


class Progress(object):
    """A one-line progress bar on a terminal; a line per 10% otherwise."""

    def __init__(self, total, stream=None, enabled=True):
        self.total = max(int(total), 1)
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.started = time.time()
        self._shown = 0.0
        self._decile = 0

    def _line(self):
        fraction = self.done / float(self.total)
        width = 30
        filled = int(round(fraction * width))
        rate = self.done / max(time.time() - self.started, 1e-9)
        return "[{}{}] {}/{} images {:3.0f}% {:.0f} img/s".format(
            "#" * filled, "." * (width - filled), self.done, self.total, 100 * fraction, rate)

    def update(self, count):
        self.done += count
        if not self.enabled:
            return
        if self.tty:
            now = time.time()
            if now - self._shown >= 0.1 or self.done >= self.total:
                self._shown = now
                self.stream.write("\r" + self._line())
                self.stream.flush()
        else:
            decile = int(10 * self.done / self.total)
            if decile > self._decile:
                self._decile = decile
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def message(self, text):
        """A line of its own (above the bar on a terminal)."""
        if self.tty:
            self.stream.write("\r\033[K" + text + "\n" + self._line())
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --------------------------------------------------------------------------- conversion


def shard_name(split, index, total):
    return "{}-{:05d}-of-{:05d}".format(split, index, total)


def _plan(split, num_shards, val_shards, seed):
    """[(split name, shard file name, [(path, label)])] with records shuffled across shards."""
    plan = []
    for name, attr in SPLITS:
        items = list(getattr(split, attr))
        if not items:
            continue
        rng = np.random.RandomState((int(seed) + (1 if name == "train" else 2)) % (2 ** 32))
        items = [items[i] for i in rng.permutation(len(items))]
        wanted = num_shards if name == "train" else val_shards
        if wanted is None:  # validation: in proportion to the training shards
            wanted = int(np.ceil(num_shards * len(items) / float(max(len(split.train), 1))))
        count = max(1, min(int(wanted), len(items)))
        for index, part in enumerate(np.array_split(np.arange(len(items)), count)):
            plan.append((name, shard_name(name, index, count), [items[i] for i in part]))
    return plan


def _is_shard_name(name):
    return any(name.startswith(split + "-") for split, _ in SPLITS)


def _is_stale_temporary(name):
    """A hidden temporary file that a killed conversion of ours left: a shard, labels.txt or the manifest."""
    if not (name.startswith(".") and ".tmp-" in name):
        return False
    target = name[1:].split(".tmp-")[0]
    return _is_shard_name(target) or target in (LABELS_FILE, MANIFEST)


def _prepare_out(out, plan):
    """Create out; clear what an earlier conversion left there. Refuses to touch foreign shard files."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError("--out {} exists and is not a folder".format(out))
    if not os.path.isdir(out):
        os.makedirs(out)
    planned = set(name for _, name, _ in plan)
    previous = set()
    manifest_path = os.path.join(out, MANIFEST)
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as handle:
                old = json.load(handle)
            previous = set(f for s in old.get("splits", {}).values() for f in s.get("files", []))
        except (ValueError, AttributeError, TypeError):
            previous = set()
    foreign = sorted(n for n in os.listdir(out) if _is_shard_name(n) and n not in planned and n not in previous)
    if foreign:
        raise UserError("--out {} already holds {} ({} file(s) this conversion would neither write nor "
                        "replace); use an empty folder".format(out, foreign[0], len(foreign)))
    # The folder is incomplete from here until the new manifest is written.
    if os.path.isfile(manifest_path):
        os.remove(manifest_path)
    for name in os.listdir(out):
        if _is_stale_temporary(name) or (name in previous and name not in planned):
            os.remove(os.path.join(out, name))


def _atomic_write(path, text):
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".tmp-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _normal_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _normal_permissions(path):
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _results(tasks, workers):
    """Worker results in task order: a spawn-context process pool, or this process for one worker."""
    if workers <= 1:
        for task in tasks:
            yield _load_chunk(task)
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold TensorFlow
    pool = context.Pool(workers)
    try:
        for result in pool.imap(_load_chunk, tasks):
            yield result
        pool.close()
    finally:
        pool.terminate()
        pool.join()


class _ShardWriter(object):
    """Writes one shard under a hidden temporary name; `commit` renames it into place."""

    def __init__(self, out, name, open_writer):
        self.final = os.path.join(out, name)
        fd, self.tmp = tempfile.mkstemp(dir=out, prefix="." + name + ".tmp-")
        os.close(fd)
        self.writer = open_writer(self.tmp)

    def write(self, payload):
        self.writer.write(payload)

    def commit(self):
        self.writer.close()
        _normal_permissions(self.tmp)
        os.replace(self.tmp, self.final)

    def abort(self):
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def convert(src, out, val_fraction=0.2, num_shards=8, val_shards=None, workers=None, seed=0,
            label_offset=0, quality=DEFAULT_QUALITY, progress=True, stream=None):
    """Convert the image folder src into TFRecords under out; returns the manifest (a dict)."""
    # Not at the top: it imports TensorFlow, and every spawn worker re-imports this module (as __mp_main__
    # under python -m), which would cost each worker TensorFlow's start-up time and memory.
    from effnet_exp.data import records

    stream = stream or sys.stderr
    _pil_image()  # fails here, not in every worker
    if num_shards < 1 or (val_shards is not None and val_shards < 1):
        raise UserError("--shards and --val-shards must be at least 1")
    if not 1 <= int(quality) <= 100:
        raise UserError("--quality must be in [1, 100], got {}".format(quality))
    split = scan_image_folder(src, val_fraction, seed, what="--src")
    out = os.path.abspath(os.path.expanduser(out))
    if out == split.root or out.startswith(split.root + os.sep):
        raise UserError("--out {} must not be inside --src {}".format(out, split.root))
    workers = int(workers or os.cpu_count() or 1)
    plan = _plan(split, int(num_shards), val_shards, seed)
    _prepare_out(out, plan)

    tasks, owner = [], []
    for shard, (_, _, items) in enumerate(plan):
        for start in range(0, len(items), _CHUNK):
            tasks.append(([(start + i, path) for i, (path, _) in enumerate(items[start:start + _CHUNK])],
                          quality))
            owner.append(shard)
    remaining = [len(range(0, len(items), _CHUNK)) for _, _, items in plan]
    total = sum(len(items) for _, _, items in plan)
    bar = Progress(total, stream, enabled=progress)
    per_class = {name: [0] * len(split.class_names) for name, _ in SPLITS}
    skipped, reencoded = [], 0
    writers = {}

    def relative(path):
        return os.path.relpath(path, split.root).replace(os.sep, "/")

    try:
        for shard, results in zip(owner, _results(tasks, workers)):
            split_name, name, items = plan[shard]
            if shard not in writers:
                writers[shard] = _ShardWriter(out, name, records.open_writer)
            for index, loaded, problem in results:
                path, label = items[index]
                if problem is not None:
                    skipped.append({"path": relative(path), "reason": problem})
                    bar.message("warning: skipping {}: {}".format(path, problem))
                    continue
                data, height, width, was_reencoded = loaded
                reencoded += int(was_reencoded)
                example = records.make_example(
                    data, label + int(label_offset), height=height, width=width,
                    text=split.class_names[label], filename=relative(path), image_format="JPEG")
                writers[shard].write(records.serialize_example(example))
                per_class[split_name][label] += 1
            bar.update(len(results))
            remaining[shard] -= 1
            if remaining[shard] == 0:
                writers.pop(shard).commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        bar.close()

    splits = {}
    for split_name, _ in SPLITS:
        files = [name for s, name, _ in plan if s == split_name]
        if not files:
            continue
        counts = per_class[split_name]
        splits[split_name] = {
            "num_records": int(sum(counts)),
            "per_class": {cls: int(n) for cls, n in zip(split.class_names, counts)},
            "files": files,
        }
    manifest = {
        "version": 1,
        "tool": "effnet_exp.tools.make_tfrecords",
        "format": "tfrecord/tf.train.Example (TF-Slim keys: image/encoded JPEG, image/class/label int64, ...)",
        "source": split.root,
        "layout": split.layout,
        "num_classes": len(split.class_names),
        "class_names": list(split.class_names),
        "label_offset": int(label_offset),
        "val_fraction": float(val_fraction) if split.layout != "split" else None,
        "split_seed": int(seed),
        "jpeg_quality": int(quality),
        "reencoded": int(reencoded),
        "splits": splits,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }
    _atomic_write(os.path.join(out, LABELS_FILE), "".join(n + "\n" for n in split.class_names))
    # Written last: its presence marks the folder complete.
    _atomic_write(os.path.join(out, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m effnet_exp.tools.make_tfrecords",
        description="Convert an image folder (one sub-folder per class, or train/ and val/ trees) into "
                    "TF-Slim style TFRecord shards, labels.txt and manifest.json.")
    parser.add_argument("--src", required=True, help="the image folder")
    parser.add_argument("--out", required=True, help="output folder (created; must not be inside --src)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="held out per class when --src has no val/ tree (default 0.2; 0: none)")
    parser.add_argument("--shards", type=int, default=8, help="training shards (default 8)")
    parser.add_argument("--val-shards", type=int, default=None,
                        help="validation shards (default: in proportion to --shards)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    parser.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    parser.add_argument("--label-offset", type=int, default=0,
                        help="added to the class index in image/class/label (1 for ImageNet-style)")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                        help="JPEG quality of re-encoded images (default 95)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    started = time.time()
    try:
        manifest = convert(args.src, args.out, val_fraction=args.val_fraction, num_shards=args.shards,
                           val_shards=args.val_shards, workers=args.workers, seed=args.seed,
                           label_offset=args.label_offset, quality=args.quality, progress=not args.quiet)
    except UserError as err:
        sys.stderr.write("error: {}\n".format(err))
        return 2
    counts = ", ".join("{} {}".format(s["num_records"], name) for name, s in sorted(manifest["splits"].items()))
    sys.stderr.write("wrote {} records ({}; {} re-encoded as RGB JPEG) in {} classes to {} in {:.1f}s{}\n".format(
        sum(s["num_records"] for s in manifest["splits"].values()), counts, manifest["reencoded"],
        manifest["num_classes"], os.path.abspath(args.out), time.time() - started,
        "; skipped {} unreadable image(s), listed in {}".format(len(manifest["skipped"]), MANIFEST)
        if manifest["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
