"""Read a PyTorch state-dict file (``torch.save(model.state_dict(), path)``) without PyTorch.

Two on-disk formats are understood:

* legacy (torch < 1.6, or ``_use_new_zipfile_serialization=False``): a sequence of pickles in one
  file -- the magic number, the protocol version (1001), a dict of system info, the state dict itself
  (whose storages are pickled as persistent ids), the list of storage keys -- followed by each
  storage's bytes, in the order of that list, each preceded by its element count as an 8-byte integer;
* zip (torch >= 1.6): ``<prefix>/data.pkl`` (the state dict, storages as persistent ids) and one
  ``<prefix>/data/<key>`` entry of raw bytes per storage (stored, not compressed, as torch writes them).

The pickles are read by :class:`RestrictedUnpickler`, whose ``find_class`` hands out only inert
stand-ins for the few globals a state dict refers to (``collections.OrderedDict``, the
``torch.*Storage`` types, ``torch._utils._rebuild_tensor_v2`` and friends). Anything else -- e.g.
``os.system``, ``builtins.eval``, ``subprocess.Popen`` -- is refused with :class:`ForbiddenGlobalError`
before it is looked up, so no code from the file ever runs. No object the unpickler builds accepts a
pickle ``BUILD`` (``__setstate__``), except that an ``OrderedDict`` may receive (and drops) the
``_metadata`` torch attaches to a state dict.

The reader is total: a damaged or hostile file ends in :class:`TorchFileError` (one line), never in
another exception, a crash or a huge allocation. Every pickle is first walked opcode by opcode
(:func:`pickletools.genops`, which builds nothing) to refuse nesting deeper than ``MAX_PICKLE_DEPTH``
(hashing a deeply nested tuple overflows the C stack), memo indices beyond the pickle's size and
arguments longer than the data; sizes, strides and offsets are checked with Python ints before numpy
sees them. Memory is bounded: the returned arrays may hold together at most ``MAX_OUTPUT_FACTOR`` times
the bytes of the file's storages plus ``MAX_OUTPUT_SLACK`` bytes, so a stride-0 tensor may broadcast a
few elements to a small tensor, but not to a huge one.

:func:`load_state_dict` returns an ``OrderedDict`` name -> numpy array (C-contiguous copies that honour
each tensor's storage offset, size and stride; bfloat16 is widened to float32).
"""
import collections
import io
import os
import pickle
import pickletools
import stat
import struct
import zipfile
import zlib

import numpy as np

from effnet_exp.errors import UserError

__all__ = [
    "TorchFileError",
    "ForbiddenGlobalError",
    "RestrictedUnpickler",
    "ALLOWED_GLOBALS",
    "STORAGE_DTYPES",
    "MAX_PICKLE_DEPTH",
    "MAX_OUTPUT_FACTOR",
    "MAX_OUTPUT_SLACK",
    "load_state_dict",
    "load_state_dict_from_bytes",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
ZIP_MAGIC = b"PK\x03\x04"

# A state dict's pickle nests about 10 levels deep (dict, parameter, tensor, args tuple, size tuple).
MAX_PICKLE_DEPTH = 100
# Output budget: tied weights (the same tensor twice) and bfloat16 widening fit; a huge broadcast does not.
MAX_OUTPUT_FACTOR = 4
MAX_OUTPUT_SLACK = 16 << 20
# Sizes, strides and offsets beyond this are refused before any arithmetic or numpy call.
MAX_INDEX = 1 << 62
# numpy 1.x refuses more dimensions than this.
MAX_DIMS = 32

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

# What the C unpickler and zipfile raise for malformed input (turned into TorchFileError).
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error, IndexError,
                    KeyError, AttributeError, OverflowError)
_ZIP_ERRORS = (zipfile.BadZipfile, zlib.error, EOFError, ValueError, struct.error, NotImplementedError,
               RuntimeError, OverflowError, KeyError, IndexError)


class TorchFileError(UserError):
    """The file is not a state dict this reader understands (or is damaged)."""


class ForbiddenGlobalError(TorchFileError):
    """The pickle refers to a global outside the state-dict allowlist."""


def _describe(value, depth=2):
    """A short, one-line description of an untrusted value: no deep repr, no huge int turned into digits."""
    if value is None or isinstance(value, (bool, float, _Sealed)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "an int of %d bits" % value.bit_length()
    if isinstance(value, (str, bytes)):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, (tuple, list)) and depth > 0:
        parts = [_describe(item, depth - 1) for item in value[:4]] + (["..."] if len(value) > 4 else [])
        brackets = "()" if isinstance(value, tuple) else "[]"
        return brackets[0] + ", ".join(parts) + brackets[1]
    return "a " + type(value).__name__


class _Sealed(object):
    """Base of every object the unpickler builds or hands out: a pickle's BUILD cannot change it."""

    def __setstate__(self, state):
        raise TorchFileError("the pickle tries to set the state of %r, which a state dict never does" % self)


class _StandIn(_Sealed):
    """Base of the objects ``find_class`` hands out."""


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
    """Stand-in for one ``torch._utils._rebuild_*`` function (or for ``collections.OrderedDict``)."""

    def __init__(self, name, func):
        self.name = name
        self.func = func

    def __repr__(self):
        return self.name

    def __call__(self, *args, **kwargs):
        try:
            return self.func(*args, **kwargs)
        except TypeError as err:
            raise TorchFileError("bad arguments to %s: %s" % (self.name, err))


class _OrderedDict(collections.OrderedDict):
    """What the stand-in for ``collections.OrderedDict`` builds: BUILD may only pass a dict, which is dropped."""

    def __setstate__(self, state):
        # torch pickles a state dict's ``_metadata`` (module versions) this way; we have no use for it.
        if not isinstance(state, dict):
            raise TorchFileError("the pickle sets the state of an OrderedDict to %s, not to a dict"
                                 % _describe(state))


class _Storage(_Sealed):
    """One storage: its element type and count; ``data`` (a 1-D numpy array) is filled in later."""

    def __init__(self, key, storage_type, numel):
        self.key = key
        self.storage_type = storage_type
        self.numel = numel
        self.data = None

    def __repr__(self):
        return "storage %r" % self.key


class _StorageView(_Sealed):
    """A legacy storage view: ``size`` elements of ``base`` starting at element ``offset``."""

    def __init__(self, base, offset, size):
        if offset < 0 or size < 0 or offset + size > base.numel:
            raise TorchFileError("a view of %d elements at %d reaches outside %r of %d elements"
                                 % (size, offset, base, base.numel))
        self.base = base
        self.offset = offset
        self.size = size

    def __repr__(self):
        return "a view of %r" % self.base


class _TensorRef(_Sealed):
    """What ``_rebuild_tensor*`` returns: materialised into a numpy array once the bytes are read."""

    def __init__(self, storage, storage_offset, size, stride):
        if not isinstance(storage, (_Storage, _StorageView)):
            raise TorchFileError("a tensor is rebuilt from %s, not from a storage" % _describe(storage))
        self.storage = storage
        self.storage_offset = _index(storage_offset, "storage offset")
        self.size = _shape(size, "size")
        self.stride = _shape(stride, "stride")
        if len(self.size) != len(self.stride):
            raise TorchFileError("a tensor has size %r but stride %r" % (self.size, self.stride))

    def __repr__(self):
        return "a tensor of size %r" % (self.size,)


def _int(value, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TorchFileError("a tensor's %s is %s, not an int" % (what, _describe(value)))
    return value


def _index(value, what):
    """A size, stride, offset or element count: an int in [0, MAX_INDEX)."""
    value = _int(value, what)
    if not 0 <= value < MAX_INDEX:
        raise TorchFileError("a tensor's %s is %s, out of range (a negative %s is not supported)"
                             % (what, _describe(value), what))
    return value


def _shape(values, what):
    if not isinstance(values, (tuple, list)):
        raise TorchFileError("a tensor's %s is %s, not a tuple" % (what, _describe(values)))
    if len(values) > MAX_DIMS:
        raise TorchFileError("a tensor's %s has %d dimensions, more than %d" % (what, len(values), MAX_DIMS))
    return tuple(_index(v, what) for v in values)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, _TensorRef):
        raise TorchFileError("a parameter is rebuilt from %s, not from a tensor" % _describe(data))
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _allowed_globals():
    """(module, name) -> a fresh stand-in; made anew for every pickle read."""
    allowed = {("collections", "OrderedDict"): _Rebuild("collections.OrderedDict", _OrderedDict)}
    for func in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter, _rebuild_parameter_with_state):
        allowed[("torch._utils", func.__name__)] = _Rebuild("torch._utils." + func.__name__, func)
    for name in STORAGE_DTYPES:
        allowed[("torch", name)] = _StorageType(name)
    return allowed


ALLOWED_GLOBALS = tuple(sorted("%s.%s" % key for key in _allowed_globals()))


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals of a PyTorch state dict (to inert stand-ins).

    ``persistent_load`` decodes the ``('storage', type, key, location, numel[, view])`` ids of both
    formats into :class:`_Storage` objects, kept in ``self.storages`` by key; pass
    ``allow_persistent=False`` for the plain pickles (magic number, storage-key list, ...).
    Feed it only pickles :func:`scan_pickle` has accepted.
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
            "refusing to load {}: its pickle refers to {}, which a PyTorch state dict never needs "
            "(only collections.OrderedDict, torch.*Storage and torch._utils._rebuild_* are allowed)".format(
                self.source, _describe("%s.%s" % key)))

    def persistent_load(self, pid):
        if not self.allow_persistent:
            raise TorchFileError("{}: unexpected persistent id {}".format(self.source, _describe(pid)))
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise TorchFileError("{}: unsupported persistent id {} (expected a storage)".format(
                self.source, _describe(pid)))
        storage = self._storage(pid[1], pid[2], pid[4])
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        # Legacy view: (view_key, offset, view_size) in elements of the root storage.
        if not (isinstance(view, tuple) and len(view) == 3):
            raise TorchFileError("{}: storage view {} is not (key, offset, size)".format(
                self.source, _describe(view)))
        return _StorageView(storage, _index(view[1], "view offset"), _index(view[2], "view size"))

    def _storage(self, storage_type, key, numel):
        if not isinstance(storage_type, _StorageType):
            raise TorchFileError("{}: storage {} has type {}, not a torch.*Storage".format(
                self.source, _describe(key), _describe(storage_type)))
        if not isinstance(key, str):
            raise TorchFileError("{}: storage key {} is not a string".format(self.source, _describe(key)))
        numel = _index(numel, "storage size")
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type, numel)
        elif storage.storage_type.dtype != storage_type.dtype or storage.numel != numel:
            raise TorchFileError("{}: storage {!r} is used as {} of {} and {} of {} elements".format(
                self.source, key, storage.storage_type, storage.numel, storage_type, numel))
        return storage


_MARK = object()


def _pop(stack, before):
    """Pops what an opcode consumes (``before``: its pickletools stack_before) -> their depths, bottom first."""
    popped = []
    count = len(before)
    if pickletools.markobject in before:
        while True:
            if not stack:
                raise ValueError("no MARK on the stack")
            item = stack.pop()
            if item is _MARK:
                break
            popped.append(item)
        count = before.index(pickletools.markobject)
    for _ in range(count):
        if not stack or stack[-1] is _MARK:
            raise ValueError("stack underflow")
        popped.append(stack.pop())
    popped.reverse()
    return popped


# Opcodes that add items to the object below them (or set its state): the result is that object.
_MUTATORS = frozenset(["APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"])


def _scan_op(op, arg, stack, memo, limit):
    """Applies one opcode to a stack of nesting depths; memo: index -> depth; limit: the largest memo index.

    The limit is the opcode's offset in the pickle: a pickler numbers its memo entries 0, 1, 2, ...
    """
    if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
        index = len(memo) if op.name == "MEMOIZE" else arg
        if not stack or stack[-1] is _MARK or not 0 <= index <= limit:
            raise ValueError("bad memo index %s" % _describe(index))
        memo[index] = stack[-1]
    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
        if arg not in memo:
            raise ValueError("memo index %s was never set" % _describe(arg))
        stack.append(memo[arg])
    elif op.name == "DUP":
        stack.extend(_pop(stack, op.stack_before) * 2)
    else:
        popped = _pop(stack, op.stack_before)
        if op.name in _MUTATORS:
            depth = max([popped[0]] + [d + 1 for d in popped[1:]])
        else:
            depth = max(popped) + 1 if popped else 0
        if depth > MAX_PICKLE_DEPTH:
            raise TorchFileError("structures nested more than %d levels deep" % MAX_PICKLE_DEPTH)
        stack.extend(_MARK if item is pickletools.markobject else depth for item in op.stack_after)


def scan_pickle(data, start, source):
    """Walks the pickle at ``data[start:]`` (bytes) without building anything -> the offset past its STOP.

    Raises :class:`TorchFileError` for anything the unpickler must not see: bad opcodes, arguments longer
    than the data (which the C unpickler would allocate before reading), memo indices beyond the data's
    size (it allocates the memo table up to the index) and nesting deeper than ``MAX_PICKLE_DEPTH``.
    """
    f = io.BytesIO(data)
    f.seek(start)
    stack, memo = [], {}
    try:
        for op, arg, pos in pickletools.genops(f):
            _scan_op(op, arg, stack, memo, pos - start)
    except TorchFileError as err:
        raise TorchFileError("{}: {}".format(source, err))
    except (ValueError, TypeError, struct.error, OverflowError, KeyError, IndexError) as err:
        raise TorchFileError("{}: not a readable PyTorch state dict (damaged pickle at byte {}: {})".format(
            source, f.tell(), _one_line(err)))
    return f.tell()


def _one_line(err):
    text = " ".join(str(err).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _restricted_load(data, start, source, storages=None, allow_persistent=False):
    """Unpickles the pickle at ``data[start:]`` -> (the object, the offset past its end)."""
    end = scan_pickle(data, start, source)
    f = io.BytesIO(data)
    f.seek(start)
    try:
        return RestrictedUnpickler(f, source, storages, allow_persistent).load(), end
    except TorchFileError:
        raise
    except _UNPICKLE_ERRORS as err:
        raise TorchFileError("{}: not a readable PyTorch state dict ({}: {})".format(
            source, type(err).__name__, _one_line(err)))


def _storage_array(storage, data, offset, nbytes, source):
    """The storage's elements: ``nbytes`` of ``data`` (bytes) from ``offset``, without a copy."""
    dtype = storage.storage_type.dtype
    expected = storage.numel * dtype.itemsize
    if nbytes != expected:
        raise TorchFileError("{}: storage {!r} has {} bytes, expected {} ({} x {})".format(
            source, storage.key, nbytes, expected, storage.numel, storage.storage_type))
    return np.frombuffer(data, dtype=dtype, count=storage.numel, offset=offset)


def _read_legacy(data, source):
    magic, pos = _restricted_load(data, 0, source)
    if not isinstance(magic, int) or magic != LEGACY_MAGIC_NUMBER:
        raise TorchFileError("{}: not a PyTorch file (no zip archive, bad magic number)".format(source))
    version, pos = _restricted_load(data, pos, source)
    if not isinstance(version, int) or version != LEGACY_PROTOCOL_VERSION:
        raise TorchFileError("{}: unsupported legacy protocol version {}".format(source, _describe(version)))
    sys_info, pos = _restricted_load(data, pos, source)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise TorchFileError("{}: written on a big-endian machine, which is not supported".format(source))
    storages = collections.OrderedDict()
    result, pos = _restricted_load(data, pos, source, storages, allow_persistent=True)
    keys, pos = _restricted_load(data, pos, source)
    if not isinstance(keys, (list, tuple)):
        raise TorchFileError("{}: the storage key list is a {}".format(source, type(keys).__name__))
    seen = set()
    for key in keys:
        storage = storages.get(key) if isinstance(key, str) else None
        if storage is None or key in seen:
            raise TorchFileError("{}: storage {} is listed twice, or listed but never used".format(
                source, _describe(key)))
        seen.add(key)
        pos = _read_legacy_storage(data, pos, storage, source)
    return result, storages


def _read_legacy_storage(data, pos, storage, source):
    """Attaches the storage's bytes at ``data[pos:]`` (element count, then bytes) -> the offset past them."""
    if pos + 8 > len(data):
        raise TorchFileError("{}: truncated before storage {!r}".format(source, storage.key))
    (numel,) = struct.unpack_from("<q", data, pos)
    if numel != storage.numel:
        raise TorchFileError("{}: storage {!r} holds {} elements, the pickle says {}".format(
            source, storage.key, numel, storage.numel))
    nbytes = numel * storage.storage_type.dtype.itemsize
    if nbytes > len(data) - pos - 8:
        raise TorchFileError("{}: truncated in storage {!r} ({} bytes expected)".format(
            source, storage.key, nbytes))
    storage.data = _storage_array(storage, data, pos + 8, nbytes, source)
    return pos + 8 + nbytes


def _check_member_names(infos, source):
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        dup = sorted(n for n in set(names) if names.count(n) > 1)[0]
        raise TorchFileError("{}: the zip holds {} more than once (duplicate names)".format(source, _describe(dup)))
    for name in names:
        parts = name.replace("\\", "/").split("/")
        drive = len(parts[0]) == 2 and parts[0][1] == ":"
        if name.startswith(("/", "\\")) or drive or ".." in parts:
            raise TorchFileError("{}: the zip member name {} is absolute or leaves the archive (path "
                                 "traversal)".format(source, _describe(name)))


def _read_member(archive, info, source, data_size):
    """The bytes of one zip member, which must be stored uncompressed (as torch writes it)."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise TorchFileError("{}: zip member {} is compressed, which torch never writes".format(
            source, _describe(info.filename)))
    if info.file_size > data_size:
        raise TorchFileError("{}: zip member {} claims {} bytes, more than the file holds".format(
            source, _describe(info.filename), info.file_size))
    return archive.read(info)


def _read_zip(data, source):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        _check_member_names(archive.infolist(), source)
        pickles = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise TorchFileError("{}: a zip file, but not a PyTorch one (no single <name>/data.pkl)".format(
                source))
        prefix = pickles[0][:-len("data.pkl")]
        if prefix + "byteorder" in infos:
            order = _read_member(archive, infos[prefix + "byteorder"], source, len(data))
            if order.decode("ascii", "replace").strip() != "little":
                raise TorchFileError("{}: byte order {} is not supported".format(source, _describe(order)))
        storages = collections.OrderedDict()
        pkl = _read_member(archive, infos[pickles[0]], source, len(data))
        result, _ = _restricted_load(pkl, 0, source, storages, allow_persistent=True)
        for key, storage in storages.items():
            member = prefix + "data/" + key
            if member not in infos:
                raise TorchFileError("{}: storage {} ({}) is missing".format(
                    source, _describe(key), _describe(member)))
            raw = _read_member(archive, infos[member], source, len(data))
            storage.data = _storage_array(storage, raw, 0, len(raw), source)
    return result, storages


def _element_span(size, stride):
    """(element count, index of the last element + 1 relative to the offset) of a strided tensor."""
    numel = 1
    for n in size:
        numel *= n
    if numel == 0:
        return 0, 0
    return numel, 1 + sum((n - 1) * s for n, s in zip(size, stride))


def _storage_elements(ref, source, name):
    """The 1-D array of the elements ``ref`` may address (its view of the storage)."""
    storage = ref.storage
    if isinstance(storage, _StorageView):
        begin, count, storage = storage.offset, storage.size, storage.base
    else:
        begin, count = 0, storage.numel
    if storage.data is None:
        raise TorchFileError("{}: no bytes for storage {!r} of {}".format(source, storage.key, _describe(name)))
    return storage.data[begin:begin + count], storage.storage_type.name == "BFloat16Storage"


def _materialise(ref, source, name, budget):
    """-> (a C-contiguous numpy array of shape ``ref.size``, the budget left in bytes)."""
    data, bfloat16 = _storage_elements(ref, source, name)
    offset = ref.storage_offset
    numel, span = _element_span(ref.size, ref.stride)
    out_itemsize = 4 if bfloat16 else data.dtype.itemsize
    nominal = 1
    for n in ref.size:
        nominal *= max(n, 1)
    if numel and offset + span > len(data):
        raise TorchFileError("{}: {} (offset {}, size {}, stride {}) reaches past its storage of {} "
                             "elements".format(source, _describe(name), offset, ref.size, ref.stride, len(data)))
    if nominal * out_itemsize >= MAX_INDEX or numel * out_itemsize > budget:
        raise TorchFileError("{}: {} has size {} (stride {}): {} elements, more than the file's storages "
                             "allow (a broadcast with stride 0 this large is not materialised)".format(
                                 source, _describe(name), ref.size, ref.stride, numel))
    if numel == 0:
        out = np.zeros(ref.size, dtype=data.dtype)
    else:
        itemsize = data.dtype.itemsize
        out = np.lib.stride_tricks.as_strided(
            data[offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride))
        out = np.array(out, order="C", copy=True)
    if bfloat16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out.astype(out.dtype.newbyteorder("="), copy=False), budget - numel * out_itemsize


def _output_budget(storages):
    total = sum(s.numel * s.storage_type.dtype.itemsize for s in storages.values() if s.data is not None)
    return MAX_OUTPUT_FACTOR * total + MAX_OUTPUT_SLACK


def _unwrap(result, source):
    """The state dict inside what the pickle held (``{"state_dict": {...}}`` is unwrapped)."""
    if isinstance(result, dict) and isinstance(result.get("state_dict"), dict):
        result = result["state_dict"]
    if not isinstance(result, dict):
        raise TorchFileError("{}: holds a {}, not a state dict".format(source, type(result).__name__))
    return result


def load_state_dict_from_bytes(data, source="<bytes>"):
    """Like :func:`load_state_dict`, for the file's contents (``bytes``); ``source`` names it in errors."""
    data = bytes(data)
    if data[:4] == ZIP_MAGIC:
        try:
            result, storages = _read_zip(data, source)
        except _ZIP_ERRORS as err:
            raise TorchFileError("{}: a damaged or truncated zip file ({}: {})".format(
                source, type(err).__name__, _one_line(err)))
    else:
        result, storages = _read_legacy(data, source)
    budget = _output_budget(storages)
    out = collections.OrderedDict()
    for name, value in _unwrap(result, source).items():
        if not isinstance(name, str):
            raise TorchFileError("{}: a state-dict key is {}, not a string".format(source, _describe(name)))
        if not isinstance(value, _TensorRef):
            raise TorchFileError("{}: entry {} is a {}, not a tensor".format(
                source, _describe(name), type(value).__name__))
        out[name], budget = _materialise(value, source, name, budget)
    return out


def load_state_dict(path):
    """Reads ``path`` (either format) -> ``OrderedDict`` name -> numpy array, in the file's order.

    A checkpoint that wraps the weights as ``{"state_dict": {...}}`` is unwrapped. Raises
    :class:`ForbiddenGlobalError` for a pickle that refers to any other global, and
    :class:`TorchFileError` for anything else it cannot read.
    """
    source = str(path)
    try:
        if not stat.S_ISREG(os.stat(source).st_mode):
            raise TorchFileError("cannot read {}: not a regular file".format(source))
        with open(source, "rb") as f:
            data = f.read()
    except (IOError, OSError) as err:
        raise TorchFileError("cannot read {}: {}".format(source, err))
    return load_state_dict_from_bytes(data, source)
