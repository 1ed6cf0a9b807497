"""Read a PyTorch state-dict file (``torch.save(model.state_dict(), path)``) without PyTorch.

Two on-disk formats are understood:

* legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): a sequence of pickles in one
  file -- the magic number, the protocol version (1001), a dict of system info, the state dict itself
  (whose storages are pickled as persistent ids), the list of storage keys -- followed by each
  storage's bytes, in the order of that list, each preceded by its element count as an 8-byte integer;
* zip (torch >= 1.6): ``<prefix>/data.pkl`` (the state dict, storages as persistent ids) and one
  ``<prefix>/data/<key>`` entry of raw bytes per storage.

The pickles are read by :class:`RestrictedUnpickler`, whose ``find_class`` hands out only inert
stand-ins for the few globals a state dict refers to (``collections.OrderedDict``, the
``torch.*Storage`` types, ``torch._utils._rebuild_tensor_v2`` and friends). Anything else -- e.g.
``os.system``, ``builtins.eval``, ``subprocess.Popen`` -- is refused with :class:`ForbiddenGlobalError`
before it is looked up, so no code from the file ever runs.

:func:`load_state_dict` returns an ``OrderedDict`` name -> numpy array (C-contiguous copies that honour
each tensor's storage offset, size and stride; bfloat16 is widened to float32).
"""
import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

from effnet_exp.errors import UserError

__all__ = [
    "TorchFileError",
    "ForbiddenGlobalError",
    "RestrictedUnpickler",
    "ALLOWED_GLOBALS",
    "STORAGE_DTYPES",
    "load_state_dict",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001

# torch storage type name -> numpy dtype of one element (little-endian; bfloat16 kept as raw bits).
STORAGE_DTYPES = collections.OrderedDict([
    ("FloatStorage", "<f4"),
    ("DoubleStorage", "<f8"),
    ("HalfStorage", "<f2"),
    ("BFloat16Storage", "<u2"),
    ("LongStorage", "<i8"),
    ("IntStorage", "<i4"),
    ("ShortStorage", "<i2"),
    ("CharStorage", "i1"),
    ("ByteStorage", "u1"),
    ("BoolStorage", "?"),
])


class TorchFileError(UserError):
    """The file is not a state dict this reader understands (or is damaged)."""


class ForbiddenGlobalError(TorchFileError):
    """The pickle refers to a global outside the state-dict allowlist."""


class _StandIn(object):
    """Base of the objects ``find_class`` hands out: a pickle's BUILD cannot change them."""

    def __setstate__(self, state):
        raise TorchFileError("the pickle tries to set the state of %r, which a state dict never does" % self)


class _StorageType(_StandIn):
    """Stand-in for ``torch.<Name>Storage``: only carries the element dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])

    def __repr__(self):
        return "torch.%s" % self.name

    def __call__(self, *args, **kwargs):
        raise TorchFileError("the pickle tries to call torch.%s directly, which a state dict never does"
                             % self.name)


class _Rebuild(_StandIn):
    """Stand-in for one ``torch._utils._rebuild_*`` function."""

    def __init__(self, name, func):
        self.name = name
        self.func = func

    def __repr__(self):
        return "torch._utils.%s" % self.name

    def __call__(self, *args, **kwargs):
        try:
            return self.func(*args, **kwargs)
        except TypeError as err:
            raise TorchFileError("bad arguments to torch._utils.%s: %s" % (self.name, err))


class _Storage(object):
    """One storage: its element type and count; ``data`` (a 1-D numpy array) is filled in later."""

    def __init__(self, key, storage_type, numel):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self.data = None


class _StorageView(object):
    """A legacy storage view: ``size`` elements of ``base`` starting at element ``offset``."""

    def __init__(self, base, offset, size):
        self.base = base
        self.offset = offset
        self.size = size


class _TensorRef(object):
    """What ``_rebuild_tensor*`` returns: materialised into a numpy array once the bytes are read."""

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise TorchFileError("a tensor is rebuilt from %r, not from a storage" % (storage,))
        self.storage = storage
        self.storage_offset = _int(storage_offset, "storage offset")
        self.size = tuple(_int(s, "size") for s in size)
        self.stride = tuple(_int(s, "stride") for s in stride)
        if len(self.size) != len(self.stride):
            raise TorchFileError("a tensor has size %r but stride %r" % (self.size, self.stride))


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TorchFileError("a tensor's %s is %r, not an int" % (what, value))
    return value


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise TorchFileError("a parameter is rebuilt from %r, not from a tensor" % (data,))
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _allowed_globals():
    """(module, name) -> a fresh stand-in; made anew for every pickle read."""
    allowed = {("collections", "OrderedDict"): collections.OrderedDict}
    for func in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state):
        allowed[("torch._utils", func.__name__)] = _Rebuild(func.__name__, func)
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    return allowed


ALLOWED_GLOBALS = tuple(sorted("%s.%s" % key for key in _allowed_globals()))


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals of a PyTorch state dict (to inert stand-ins).

    ``persistent_load`` decodes the ``('storage', type, key, location, numel[, view])`` ids of both
    formats into :class:`_Storage` objects, kept in ``self.storages`` by key; pass
    ``allow_persistent=False`` for the plain pickles (magic number, storage-key list, ...).
    """

    def __init__(self, file, source="<pickle>", storages=None, allow_persistent=True):
        super(RestrictedUnpickler, self).__init__(file)
        self.source = source
        self.storages = storages if storages is not None else collections.OrderedDict()
        self.allow_persistent = allow_persistent
        self._allowed = _allowed_globals()

    def find_class(self, module, name):
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        raise ForbiddenGlobalError(
            "refusing to load {}: its pickle refers to {}.{}, which a PyTorch state dict never needs "
            "(only collections.OrderedDict, torch.*Storage and torch._utils._rebuild_* are allowed)".format(
                self.source, module, name))

    def persistent_load(self, pid):
        if not self.allow_persistent:
            raise TorchFileError("{}: unexpected persistent id {!r}".format(self.source, pid))
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchFileError("{}: unsupported persistent id {!r} (expected a storage)".format(
                self.source, pid))
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError("{}: storage {!r} has type {!r}, not a torch.*Storage".format(
                self.source, key, storage_type))
        key = str(key)
        numel = _int(numel, "storage size")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        elif storage.storage_type.dtype != storage_type.dtype:
            raise TorchFileError("{}: storage {!r} is used as {} and {}".format(
                self.source, key, storage.storage_type, storage_type))
        view = pid[5] if len(pid) == 6 else None
        if view is not None:
            # Legacy view: (view_key, offset, view_size) in elements of the root storage.
            _, offset, size = view
            return _StorageView(storage, _int(offset, "view offset"), _int(size, "view size"))
        return storage


def _restricted_load(fileobj, source, storages=None, allow_persistent=False):
    try:
        return RestrictedUnpickler(fileobj, source, storages, allow_persistent).load()
    except TorchFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, IndexError,
            KeyError, AttributeError) as err:
        raise TorchFileError("{}: not a readable PyTorch state dict ({}: {})".format(
            source, type(err).__name__, err))


def _storage_array(storage, raw, source):
    dtype = storage.storage_type.dtype
    expected = storage.numel * dtype.itemsize
    if len(raw) != expected:
        raise TorchFileError("{}: storage {!r} has {} bytes, expected {} ({} x {})".format(
            source, storage.key, len(raw), expected, storage.numel, storage.storage_type))
    return np.frombuffer(raw, dtype=dtype)


def _read_legacy(f, source):
    file_size = os.fstat(f.fileno()).st_size
    magic = _restricted_load(f, source)
    if magic != LEGACY_MAGIC_NUMBER:
        raise TorchFileError("{}: not a PyTorch file (no zip archive, bad magic number)".format(source))
    version = _restricted_load(f, source)
    if version != LEGACY_PROTOCOL_VERSION:
        raise TorchFileError("{}: unsupported legacy protocol version {!r}".format(source, version))
    sys_info = _restricted_load(f, source)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise TorchFileError("{}: written on a big-endian machine, which is not supported".format(source))
    storages = collections.OrderedDict()
    result = _restricted_load(f, source, storages, allow_persistent=True)
    keys = _restricted_load(f, source)
    if not isinstance(keys, (list, tuple)):
        raise TorchFileError("{}: the storage key list is {!r}".format(source, type(keys).__name__))
    for key in keys:
        key = str(key)
        storage = storages.get(key)
        if storage is None:
            raise TorchFileError("{}: storage {!r} is listed but never used".format(source, key))
        head = f.read(8)
        if len(head) != 8:
            raise TorchFileError("{}: truncated before storage {!r}".format(source, key))
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise TorchFileError("{}: storage {!r} holds {} elements, the pickle says {}".format(
                source, key, numel, storage.numel))
        nbytes = numel * storage.storage_type.dtype.itemsize
        if nbytes > file_size - f.tell():
            raise TorchFileError("{}: truncated in storage {!r} ({} bytes expected)".format(source, key, nbytes))
        storage.data = _storage_array(storage, f.read(nbytes), source)
    return result, storages


def _read_zip(path, source):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError("{}: a zip file, but not a PyTorch one (no single <name>/data.pkl)".format(
                source))
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in names:
            order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order != "little":
                raise TorchFileError("{}: byte order {!r} is not supported".format(source, order))
        storages = collections.OrderedDict()
        result = _restricted_load(io.BytesIO(archive.read(pickles[0])), source, storages,
                                  allow_persistent=True)
        for key, storage in storages.items():
            member = prefix + "data/" + key
            if member not in names:
                raise TorchFileError("{}: storage {!r} ({}) is missing".format(source, key, member))
            nbytes = storage.numel * storage.storage_type.dtype.itemsize
            if archive.getinfo(member).file_size != nbytes:
                raise TorchFileError("{}: storage {!r} has {} bytes, expected {}".format(
                    source, key, archive.getinfo(member).file_size, nbytes))
            storage.data = _storage_array(storage, archive.read(member), source)
    return result, storages


def _materialise(ref, source, name):
    storage = ref.storage
    offset = ref.storage_offset
    if isinstance(storage, _StorageView):
        base_offset, view_size = storage.offset, storage.size
        storage = storage.base
    else:
        base_offset, view_size = 0, storage.numel
    if storage.data is None:
        raise TorchFileError("{}: no bytes for storage {!r} of {!r}".format(source, storage.key, name))
    data = storage.data[base_offset:base_offset + view_size]
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or offset < 0:
        raise TorchFileError("{}: {!r} has a negative size, stride or offset".format(source, name))
    if 0 in ref.size:
        out = np.zeros(ref.size, dtype=data.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= len(data):
            raise TorchFileError("{}: {!r} (offset {}, size {}, stride {}) reaches past its storage of {} "
                                 "elements".format(source, name, offset, ref.size, ref.stride, len(data)))
        itemsize = data.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            data[offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride))
        out = np.array(out, order="C", copy=True)
    if storage.storage_type.name == "BFloat16Storage":
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False)


def load_state_dict(path):
    """Reads ``path`` (either format) -> ``OrderedDict`` name -> numpy array, in the file's order.

    A checkpoint that wraps the weights as ``{"state_dict": {...}}`` is unwrapped. Raises
    :class:`ForbiddenGlobalError` for a pickle that refers to any other global, and
    :class:`TorchFileError` for anything else it cannot read.
    """
    source = str(path)
    try:
        is_zip = zipfile.is_zipfile(source)
    except (IOError, OSError) as err:
        raise TorchFileError("cannot read {}: {}".format(source, err))
    try:
        if is_zip:
            result, _ = _read_zip(source, source)
        else:
            with open(source, "rb") as f:
                result, _ = _read_legacy(f, source)
    except (IOError, OSError, zipfile.BadZipfile) as err:
        raise TorchFileError("cannot read {}: {}".format(source, err))
    if isinstance(result, dict) and isinstance(result.get("state_dict"), dict):
        result = result["state_dict"]
    if not isinstance(result, dict):
        raise TorchFileError("{}: holds a {}, not a state dict".format(source, type(result).__name__))
    out = collections.OrderedDict()
    for name, value in result.items():
        if isinstance(value, _TensorRef):
            out[str(name)] = _materialise(value, source, name)
        else:
            raise TorchFileError("{}: entry {!r} is a {}, not a tensor".format(
                source, name, type(value).__name__))
    return out
