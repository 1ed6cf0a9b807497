"""Image folders: one sub-folder per class, scanned and split in plain Python (no TensorFlow import).

Layouts accepted under a root folder:

    root/<class>/.../*.jpg|*.jpeg|*.png              validation split off by fraction and seed
    root/train/<class>/...  [root/val/<class>/...]   separate trees (`validation/` also accepted);
                                                      without a val tree the fraction split applies

Class index = position in the sorted list of class folder names (of `train/` in the second layout).
Files are found recursively inside a class folder; hidden files and folders are ignored, and so are
files that are not images (README, .txt, ...). Image formats other than JPEG and PNG are rejected by
extension with a message naming a file. The split is stratified and deterministic: per class (in class
order), the sorted file list is permuted by one numpy RandomState(seed) and the first
round(fraction * n) files (at least 1 and at most n - 1 for a class of two or more) go to validation.

`make_tfrecords` and `dataset=image_folder` use this same code, so with the same fraction and seed they
split a folder identically.
"""
import os
import struct
from collections import namedtuple

import numpy as np

from effnet_exp.errors import UserError

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Image files we recognise but do not read: rejected with a clear message rather than ignored.
UNSUPPORTED_EXTENSIONS = (".bmp", ".gif", ".webp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl",
                          ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".psd",
                          ".dng", ".cr2", ".nef", ".arw", ".raw", ".exr", ".hdr", ".svg")
TRAIN_DIR = "train"
VAL_DIRS = ("val", "validation")

FolderSplit = namedtuple("FolderSplit", "root class_names train val layout ignored")
FolderSplit.__doc__ = """A scanned image folder.

root: absolute path; class_names: sorted folder names; train / val: lists of (absolute path, label)
sorted by (label, path); layout: "split" (train/ + val/ trees), "train_only" (train/ tree, fraction
split) or "classes" (class folders at the root, fraction split); ignored: number of non-image files."""

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
)


def sniff_image_format(data):
    """'jpeg', 'png' (the two we decode), another name we recognise ('gif', 'bmp', 'webp', 'tiff', ...),
    or None, from the first bytes of a file."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "heif/avif"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


# The most pixels an image may have, checked from its header before it is decoded: Pillow's default
# Image.MAX_IMAGE_PIXELS (a 24-bit image of 256 MiB), so that a tiny file declaring a huge image (a
# decompression bomb) is refused instead of filling the memory.
MAX_IMAGE_PIXELS = 1024 * 1024 * 1024 // 4 // 3
# JPEG start-of-frame markers (they hold the size): C0-CF except C4 (DHT), C8 (JPG) and CC (DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data):
    """(width, height) from the first start-of-frame segment of JPEG data, or None."""
    pos = 2
    while pos + 9 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", bytes(data[pos + 5:pos + 9]))
            return width, height
        pos += 2 + struct.unpack(">H", bytes(data[pos + 2:pos + 4]))[0]
    return None


def image_size_of(data):
    """(width, height) of JPEG or PNG data read from its header (nothing decoded), or None when the header
    does not say (another format, or too short)."""
    fmt = sniff_image_format(data)
    if fmt == "png" and len(data) >= 24 and bytes(data[12:16]) == b"IHDR":
        return struct.unpack(">II", bytes(data[16:24]))
    if fmt == "jpeg":
        return _jpeg_size(bytearray(data[:1 << 20]))
    return None


def image_problem(data):
    """Why image bytes must not be decoded, as a verb phrase ("is empty (0 bytes)", "declares ... pixels"): empty,
    or more than MAX_IMAGE_PIXELS by their header. None when neither."""
    if not data:
        return "is empty (0 bytes)"
    size = image_size_of(data)
    if size and size[0] * size[1] > MAX_IMAGE_PIXELS:
        return "declares {}x{} pixels in its header, more than the limit of {} (a decompression bomb?); it is " \
               "not decoded".format(size[0], size[1], MAX_IMAGE_PIXELS)
    return None


def sniff_file_format(path):
    with open(path, "rb") as handle:
        return sniff_image_format(handle.read(16))


def _fail(what, root, message):
    raise UserError("{}={}: {}".format(what, root, message))


def _visible_dirs(folder):
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith(".") and os.path.isdir(os.path.join(folder, name)))


def _class_images(class_dir):
    """Sorted supported image paths under class_dir (recursive), unsupported ones, ignored count."""
    images, unsupported, ignored = [], [], 0
    for parent, dirs, files in os.walk(class_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            path = os.path.join(parent, name)
            if ext in SUPPORTED_EXTENSIONS:
                images.append(path)
            elif ext in UNSUPPORTED_EXTENSIONS:
                unsupported.append(path)
            else:
                ignored += 1
    return sorted(images), sorted(unsupported), ignored


def _scan_tree(tree, class_names, what, root):
    """[(path, label)] for the class folders of tree (a subset of class_names when given)."""
    names = _visible_dirs(tree)
    if class_names is None:
        class_names = names
    else:
        extra = [n for n in names if n not in class_names]
        if extra:
            _fail(what, root, "class folder {!r} in {} has no counterpart in the training tree".format(
                extra[0], tree))
    items, ignored = [], 0
    index = {name: i for i, name in enumerate(class_names)}
    for name in names:
        folder = os.path.join(tree, name)
        images, unsupported, skipped = _class_images(folder)
        ignored += skipped
        if unsupported:
            _fail(what, root, "{} is a {} file: only JPEG and PNG images are read ({} such file(s); convert "
                              "them to JPEG or PNG, or remove them)".format(
                                  unsupported[0], os.path.splitext(unsupported[0])[1].lower().lstrip("."),
                                  len(unsupported)))
        if not images:
            _fail(what, root, "class folder {} has no images (.jpg, .jpeg or .png)".format(folder))
        items.extend((path, index[name]) for path in images)
    return class_names, items, ignored


def stratified_split(items, num_classes, fraction, seed):
    """(train, val) lists of (path, label): per class, deterministic in (items, fraction, seed)."""
    rng = np.random.RandomState(int(seed) % (2 ** 32))
    train, val = [], []
    by_class = [[] for _ in range(num_classes)]
    for item in items:
        by_class[item[1]].append(item)
    for members in by_class:
        members = sorted(members)
        n = len(members)
        n_val = int(round(fraction * n)) if fraction > 0 else 0
        if fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        else:
            n_val = min(n_val, max(n - 1, 0))
        order = rng.permutation(n)
        chosen = set(order[:n_val].tolist())
        for i, item in enumerate(members):
            (val if i in chosen else train).append(item)
    return sorted(train, key=_order), sorted(val, key=_order)


def _order(item):
    return item[1], item[0]


def scan_image_folder(root, val_fraction=0.2, seed=0, what="dataset.root"):
    """Scan root (see the module docstring) -> FolderSplit. Raises UserError naming root and the fault.

    `what` names the setting in messages ("dataset.root" or "--src").
    """
    if not root:
        raise UserError("{} is not set (the folder with one sub-folder per class)".format(what))
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
        _fail(what, root, "does not exist or is not a folder")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        _fail(what, root, "the validation fraction must be in [0, 1), got {}".format(val_fraction))
    subdirs = _visible_dirs(root)
    if TRAIN_DIR in subdirs:
        train_tree = os.path.join(root, TRAIN_DIR)
        val_tree = next((os.path.join(root, d) for d in VAL_DIRS if d in subdirs), None)
        if not _visible_dirs(train_tree):
            _fail(what, root, "{} has no class folders".format(train_tree))
        class_names, train, ignored = _scan_tree(train_tree, None, what, root)
        if val_tree is not None:
            _, val, more = _scan_tree(val_tree, class_names, what, root)
            return FolderSplit(root, class_names, sorted(train, key=_order), sorted(val, key=_order),
                               "split", ignored + more)
        train, val = stratified_split(train, len(class_names), val_fraction, seed)
        return FolderSplit(root, class_names, train, val, "train_only", ignored)
    if not subdirs:
        loose = [n for n in os.listdir(root) if os.path.splitext(n)[1].lower() in SUPPORTED_EXTENSIONS]
        hint = (" ({} images lie directly in it: put each class's images in a sub-folder named after "
                "the class)".format(len(loose)) if loose else "")
        _fail(what, root, "has no class folders: expected one sub-folder per class holding .jpg, .jpeg or "
                          ".png images, or train/ and val/ trees of such folders" + hint)
    class_names, items, ignored = _scan_tree(root, None, what, root)
    train, val = stratified_split(items, len(class_names), val_fraction, seed)
    return FolderSplit(root, class_names, train, val, "classes", ignored)
