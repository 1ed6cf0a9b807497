"""Crafted PyTorch state-dict files, written without torch: a tiny protocol-2 pickle writer and a fake state dict."""
import collections
import io
import struct
import zipfile

import numpy as np

# --------------------------------------------------------------------------
# A tiny protocol-2 pickle writer, so the tests write torch's byte streams without torch
# --------------------------------------------------------------------------

class G(object):
    """A global reference (GLOBAL opcode)."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class R(object):
    """func(*args) (REDUCE opcode)."""

    def __init__(self, func, args):
        self.func, self.args = func, tuple(args)


class P(object):
    """A persistent id (BINPERSID opcode)."""

    def __init__(self, pid):
        self.pid = pid


class Raw(object):
    """Opcodes written as given (for what a state dict never holds)."""

    def __init__(self, data):
        self.data = data


class Build(object):
    """obj, then state, then BUILD (obj.__setstate__(state))."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class OD(object):
    """collections.OrderedDict built as torch's pickles do: OrderedDict() then SETITEMS."""

    def __init__(self, items):
        self.items = list(items)


def _emit(obj, out):
    if obj is None:
        out += b"N"
    elif obj is True:
        out += b"\x88"
    elif obj is False:
        out += b"\x89"
    elif isinstance(obj, int):
        if -2 ** 31 <= obj < 2 ** 31:
            out += b"J" + struct.pack("<i", obj)
        else:
            data = obj.to_bytes((obj.bit_length() + 8) // 8, "little", signed=True)
            if len(data) < 256:
                out += b"\x8a" + struct.pack("<B", len(data)) + data
            else:
                out += b"\x8b" + struct.pack("<i", len(data)) + data
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out += b"X" + struct.pack("<I", len(data)) + data
    elif isinstance(obj, tuple):
        if not obj:
            out += b")"
        else:
            out += b"("
            for item in obj:
                _emit(item, out)
            out += b"t"
    elif isinstance(obj, list):
        out += b"]"
        if obj:
            out += b"("
            for item in obj:
                _emit(item, out)
            out += b"e"
    elif isinstance(obj, (dict, OD)):
        if isinstance(obj, OD):
            _emit(R(G("collections", "OrderedDict"), ()), out)
            items = obj.items
        else:
            out += b"}"
            items = list(obj.items())
        if items:
            out += b"("
            for key, value in items:
                _emit(key, out)
                _emit(value, out)
            out += b"u"
    elif isinstance(obj, G):
        out += b"c" + obj.module.encode("ascii") + b"\n" + obj.name.encode("ascii") + b"\n"
    elif isinstance(obj, R):
        _emit(obj.func, out)
        _emit(obj.args, out)
        out += b"R"
    elif isinstance(obj, P):
        _emit(obj.pid, out)
        out += b"Q"
    elif isinstance(obj, Raw):
        out += obj.data
    elif isinstance(obj, Build):
        _emit(obj.obj, out)
        _emit(obj.state, out)
        out += b"b"
    else:
        raise TypeError(obj)


def dumps(obj):
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    out += b"."
    return bytes(out)


STORAGE_NAMES = {"<f4": "FloatStorage", "<f8": "DoubleStorage", "<f2": "HalfStorage", "<i8": "LongStorage",
                 "<i4": "IntStorage", "|u1": "ByteStorage", "|b1": "BoolStorage"}


class FakeStateDict(object):
    """Storages (key -> 1-D numpy array) and tensors on them, written in either torch format."""

    def __init__(self):
        self.storages = collections.OrderedDict()
        self.entries = []  # (name, pickled value, expected numpy array)

    def storage(self, key, array, type_name=None):
        array = np.ascontiguousarray(array).reshape(-1)
        self.storages[key] = (array, type_name or STORAGE_NAMES[array.dtype.str])

    def tensor(self, name, key, offset, size, stride, expected, parameter=False, legacy_view=None):
        self.entries.append((name, key, offset, tuple(size), tuple(stride), parameter, legacy_view, expected))

    def _state(self, legacy):
        items = []
        for name, key, offset, size, stride, parameter, view, _ in self.entries:
            array, type_name = self.storages[key]
            pid = ("storage", G("torch", type_name), key, "cpu", int(array.size))
            if legacy:
                pid = pid + (view,)
            t = R(G("torch._utils", "_rebuild_tensor_v2"),
                  (P(pid), offset, size, stride, False, OD([])))
            if parameter:
                t = R(G("torch._utils", "_rebuild_parameter"), (t, True, OD([])))
            items.append((name, t))
        return OD(items)

    def expected(self):
        return collections.OrderedDict((e[0], e[-1]) for e in self.entries)

    def write_legacy(self, path):
        out = io.BytesIO()
        out.write(dumps(0x1950A86A20F9469CFC6C))
        out.write(dumps(1001))
        out.write(dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}))
        out.write(dumps(self._state(legacy=True)))
        keys = list(self.storages)
        out.write(dumps(keys))
        for key in keys:
            array, _ = self.storages[key]
            out.write(struct.pack("<q", array.size))
            out.write(array.tobytes())
        with open(str(path), "wb") as f:
            f.write(out.getvalue())
        return str(path)

    def write_zip(self, path, prefix="archive"):
        with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
            z.writestr(prefix + "/data.pkl", dumps(self._state(legacy=False)))
            z.writestr(prefix + "/byteorder", b"little")
            for key, (array, _) in self.storages.items():
                z.writestr(prefix + "/data/" + key, array.tobytes())
            z.writestr(prefix + "/version", b"3\n")
        return str(path)


def make_fake():
    fake = FakeStateDict()
    f32 = np.arange(24, dtype=np.float32) * 0.5 - 3.0
    fake.storage("0", f32)
    fake.tensor("conv.weight", "0", 0, (2, 3, 2, 2), (12, 4, 2, 1), f32.reshape(2, 3, 2, 2))
    f64 = np.linspace(-1.0, 1.0, 12)
    fake.storage("1", f64)
    # Non-contiguous: the transpose of a 3x4 matrix.
    fake.tensor("fc.weight_t", "1", 0, (4, 3), (1, 4), f64.reshape(3, 4).T)
    i64 = np.arange(10, dtype=np.int64) * 7 - 20
    fake.storage("2", i64)
    # Storage offset + stride 2, and two more tensors sharing the same storage.
    fake.tensor("strided", "2", 1, (3,), (2,), i64[1:7:2])
    fake.tensor("shared.block", "2", 5, (2, 2), (2, 1), i64[5:9].reshape(2, 2))
    fake.tensor("bn.num_batches_tracked", "2", 3, (), (), np.array(i64[3]))
    f16 = np.array([0.5, -1.25, 65504.0], dtype=np.float16)
    fake.storage("3", f16)
    fake.tensor("half", "3", 1, (2,), (1,), f16[1:])
    bf16_values = np.array([1.5, -2.0, 0.0078125, 2.0 ** 100], dtype=np.float32)
    fake.storage("4", (bf16_values.view(np.uint32) >> 16).astype(np.uint16), "BFloat16Storage")
    fake.tensor("bf16", "4", 0, (4,), (1,), bf16_values)
    fake.tensor("param", "0", 4, (2, 2), (1, 2), f32[4:8].reshape(2, 2).T, parameter=True)
    fake.tensor("empty", "0", 0, (0, 3), (3, 1), np.zeros((0, 3), np.float32))
    b = np.array([True, False, True])
    fake.storage("5", b)
    fake.tensor("mask", "5", 0, (3,), (1,), b)
    return fake


def assert_same(got, expected):
    assert list(got) == list(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert got[name].flags["C_CONTIGUOUS"], name
