"""The torch reader is total: hostile or damaged files end in its own one-line TorchFileError, with bounded memory."""
import json
import os
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from effnet_exp.errors import UserError
from effnet_exp.model.pretrained.packages import default_source
from effnet_exp.model.pretrained.torch_pickle import TorchFileError, load_state_dict, load_state_dict_from_bytes
from torch_files import OD, G, P, R, Build, FakeStateDict, Raw, assert_same, dumps

TESTS = os.path.dirname(os.path.abspath(__file__))
LEGACY_HEADER = dumps(0x1950A86A20F9469CFC6C) + dumps(1001) + dumps({"little_endian": True})
# Mutated copies of the Lite0 file per format (each case copies and parses a 18 MB file: 30-80 ms).
FUZZ_CASES = {"legacy": 200, "zip": 100}


def tensor(key="0", numel=4, offset=0, size=(4,), stride=(1,), view=None):
    pid = ("storage", G("torch", "FloatStorage"), key, "cpu", numel) + ((view,) if view is not None else ())
    return R(G("torch._utils", "_rebuild_tensor_v2"), (P(pid), offset, size, stride, False, OD([])))


def legacy_file(tmp_path, state, storages=(("0", 4),), name="hostile.pth"):
    """A legacy file: header, the state pickle, the key list, then each storage's count and float32 bytes."""
    out = LEGACY_HEADER + dumps(state) + dumps([key for key, _ in storages])
    for key, numel in storages:
        out += struct.pack("<q", numel) + np.arange(numel, dtype=np.float32).tobytes()
    path = tmp_path / name
    path.write_bytes(out)
    return str(path)


def zip_file(tmp_path, members, name="hostile.pt"):
    """A zip of (name, bytes) members, stored as torch does (duplicates allowed)."""
    path = tmp_path / name
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_STORED) as z:
        for member, data in members:
            z.writestr(member, data)
    return str(path)


def torch_zip_members(state, numel=4):
    return [("archive/data.pkl", dumps(state)), ("archive/byteorder", b"little"),
            ("archive/data/0", np.arange(numel, dtype=np.float32).tobytes()), ("archive/version", b"3\n")]


def refused(path, *words):
    """Loads path expecting the reader's own error; each word must appear in its one-line message."""
    with pytest.raises(TorchFileError) as err:
        load_state_dict(path)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg, msg
    for word in words:
        assert word in msg, (word, msg)
    return msg


def nested(depth, inner=0):
    """Raw opcodes for a tuple nested depth levels deep: inner, TUPLE1, TUPLE1, ..."""
    return Raw(b"J" + struct.pack("<i", inner) + b"\x85" * depth)


# --------------------------------------------------------------------------
# BUILD cannot rewrite what the unpickler built
# --------------------------------------------------------------------------

def test_build_on_tensor_is_refused(tmp_path):
    state = OD([("w", Build(tensor(), {"size": "abc"}))])
    refused(legacy_file(tmp_path, state), "state", "tensor")


def test_build_on_storage_is_refused(tmp_path):
    pid = ("storage", G("torch", "FloatStorage"), "0", "cpu", 4)
    storage = Build(P(pid), {"storage_type": "x"})
    state = OD([("w", R(G("torch._utils", "_rebuild_tensor_v2"), (storage, 0, (4,), (1,), False, OD([]))))])
    refused(zip_file(tmp_path, torch_zip_members(state)), "state", "storage '0'")


def test_build_on_ordered_dict_cannot_shadow_its_methods(tmp_path):
    # torch attaches _metadata to a state dict this way; an attacker could shadow items() or get().
    state = Build(OD([("w", tensor())]), {"items": [1], "get": [2], "_metadata": {}})
    got = load_state_dict(legacy_file(tmp_path, state))
    assert_same(got, {"w": np.arange(4, dtype=np.float32)})
    refused(legacy_file(tmp_path, Build(OD([("w", tensor())]), [1])), "state", "OrderedDict")


# --------------------------------------------------------------------------
# Sizes, strides and offsets are checked with Python ints before numpy sees them
# --------------------------------------------------------------------------

def test_stride_zero_broadcast_is_bounded(tmp_path):
    # A small broadcast is fine (torch's expand); a huge one is refused instead of allocated.
    small = load_state_dict(legacy_file(tmp_path, OD([("w", tensor(size=(1000,), stride=(0,)))]), name="ok.pth"))
    np.testing.assert_array_equal(small["w"], np.zeros(1000, np.float32))
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(2 ** 40,), stride=(0,)))])), "stride", "'w'")
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(2 ** 24, 4), stride=(0, 1)))])), "stride", "'w'")


def test_negative_stride_and_offsets_are_refused(tmp_path):
    refused(legacy_file(tmp_path, OD([("w", tensor(offset=3, size=(2,), stride=(-1,)))])), "stride", "negative")
    refused(legacy_file(tmp_path, OD([("w", tensor(offset=-1))])), "offset", "negative")
    # A legacy storage view at a negative offset would slice from the end of the storage.
    view = OD([("w", tensor(size=(2,), view=("v", -2, 2)))])
    refused(legacy_file(tmp_path, view), "view", "negative")


def test_size_overflow_and_past_the_storage_are_refused(tmp_path):
    # The element count overflows int64; with stride 0 every element is inside the storage.
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(2 ** 32, 2 ** 32), stride=(0, 0)))])), "size", "'w'")
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(2 ** 70,), stride=(0,)))])), "size", "out of range")
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(5,), stride=(1,)))])), "reaches past", "'w'")
    refused(legacy_file(tmp_path, OD([("w", tensor(offset=10 ** 5000, size=(1,)))])), "offset", "bits")
    # Zero elements, but dimensions numpy cannot represent.
    refused(legacy_file(tmp_path, OD([("w", tensor(size=(0, 2 ** 61, 2 ** 61), stride=(1, 1, 1)))])), "size")


def test_storage_larger_than_its_data_is_refused(tmp_path):
    refused(legacy_file(tmp_path, OD([("w", tensor(numel=1000))]), storages=[("0", 4)]), "storage '0'")
    refused(zip_file(tmp_path, torch_zip_members(OD([("w", tensor(numel=1000))]))), "storage '0'")
    # The zip's directory claims as many bytes as the pickle wants, more than the file holds.
    path = zip_file(tmp_path, torch_zip_members(OD([("w", tensor(numel=2 ** 28))])))
    data = bytearray(open(path, "rb").read())
    small = struct.pack("<II", 16, 16)
    for at in _all(data, small):
        data[at:at + 8] = struct.pack("<II", 2 ** 30, 2 ** 30)
    (tmp_path / "forged.pt").write_bytes(bytes(data))
    refused(str(tmp_path / "forged.pt"), "forged.pt")


def _all(data, needle):
    at = data.find(needle)
    while at >= 0:
        yield at
        at = data.find(needle, at + 1)


def test_pickle_lengths_and_memo_indices_beyond_the_data_are_refused(tmp_path):
    # BINBYTES8 claiming 2**62 bytes and LONG_BINPUT at index 2**32 - 1: the C unpickler would allocate both.
    huge_bytes = b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 62) + b"xx."
    (tmp_path / "bytes.pth").write_bytes(huge_bytes)
    refused(str(tmp_path / "bytes.pth"), "damaged pickle")
    memo = LEGACY_HEADER + dumps(OD([("w", Raw(b"N" + b"r" + struct.pack("<I", 2 ** 32 - 1)))]))
    (tmp_path / "memo.pth").write_bytes(memo)
    refused(str(tmp_path / "memo.pth"), "memo index")


# --------------------------------------------------------------------------
# Deep nesting
# --------------------------------------------------------------------------

def test_deeply_nested_values_are_refused(tmp_path):
    # In a persistent id (whose repr used to recurse) and as a plain entry.
    pid = P(("storage", nested(100000), "0", "cpu", 4))
    refused(legacy_file(tmp_path, OD([("w", pid)])), "nested")
    refused(legacy_file(tmp_path, OD([("w", nested(100000))])), "nested")
    deep_list = Raw(b"]" + b"]" * 50000 + b"a" * 50000)
    refused(legacy_file(tmp_path, OD([("w", deep_list)])), "nested")


def test_deeply_nested_dict_key_is_refused(tmp_path):
    # Hashing a tuple a million levels deep overflows the C stack: run where a crash cannot take pytest down.
    path = legacy_file(tmp_path, OD([(nested(10 ** 6), tensor())]))
    code = ("import sys; from effnet_exp.model.pretrained.torch_pickle import TorchFileError, load_state_dict\n"
            "try:\n    load_state_dict(sys.argv[1])\nexcept TorchFileError as err:\n    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300, cwd=os.path.dirname(TESTS))
    assert proc.returncode == 0 and "nested" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-2000:])


# --------------------------------------------------------------------------
# Zip archives
# --------------------------------------------------------------------------

def test_zip_path_traversal_is_refused(tmp_path):
    good = torch_zip_members(OD([("w", tensor())]))
    refused(zip_file(tmp_path, good + [("../evil", b"x")]), "'../evil'", "traversal")
    refused(zip_file(tmp_path, good + [("/etc/evil", b"x")]), "'/etc/evil'", "absolute")
    moved = [(name.replace("archive/", "../"), data) for name, data in good]
    refused(zip_file(tmp_path, moved), "traversal")


def test_zip_duplicate_names_are_refused(tmp_path):
    members = torch_zip_members(OD([("w", tensor())])) + [("archive/data/0", b"\0" * 16)]
    with pytest.warns(UserWarning):
        path = zip_file(tmp_path, members)
    refused(path, "duplicate", "'archive/data/0'")


def test_truncated_and_compressed_zips_are_refused(tmp_path):
    fake = FakeStateDict()
    fake.storage("0", np.arange(64, dtype=np.float32))
    fake.tensor("w", "0", 0, (64,), (1,), np.arange(64, dtype=np.float32))
    data = open(fake.write_zip(tmp_path / "ok.pt"), "rb").read()
    for size in (10, 100, len(data) // 2, len(data) - 30, len(data) - 1):
        (tmp_path / "cut.pt").write_bytes(data[:size])
        refused(str(tmp_path / "cut.pt"), "cut.pt")
    # A compressed storage (a zip bomb's way to claim much more than the file holds).
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(str(bomb), "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", dumps(OD([("w", tensor(numel=2 ** 22, size=(2 ** 22,)))])))
        z.writestr("archive/data/0", b"\0" * 2 ** 24)
    refused(str(bomb), "compressed")


def test_legacy_truncations_are_refused(tmp_path):
    data = open(legacy_file(tmp_path, OD([("w", tensor())]), name="ok.pth"), "rb").read()
    for size in range(0, len(data)):
        (tmp_path / "cut.pth").write_bytes(data[:size])
        refused(str(tmp_path / "cut.pth"), "cut.pth")
    refused(str(tmp_path), "not a regular file")


def test_loading_from_bytes(tmp_path):
    fake = FakeStateDict()
    fake.storage("0", np.arange(6, dtype=np.float32))
    fake.tensor("w", "0", 0, (2, 3), (3, 1), np.arange(6, dtype=np.float32).reshape(2, 3))
    for fmt in ("legacy", "zip"):
        with open(getattr(fake, "write_" + fmt)(tmp_path / fmt), "rb") as f:
            assert_same(load_state_dict_from_bytes(f.read()), fake.expected())
    with pytest.raises(TorchFileError, match="<bytes>"):
        load_state_dict_from_bytes(b"")


# --------------------------------------------------------------------------
# Fuzzing the real Lite0 file
# --------------------------------------------------------------------------

def test_fuzz_lite0(capsys):
    try:
        lite0 = default_source("efficientnet_lite0")
    except UserError as err:
        pytest.skip(str(err))
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, os.path.join(TESTS, "torch_fuzz.py"), fmt, str(count),
                                 str(1000 + i), lite0], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True, env=env)
               for i, (fmt, count) in enumerate(sorted(FUZZ_CASES.items()))]
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, "fuzz worker failed (%d):\n%s\n%s" % (worker.returncode, out, err[-5000:])
        counts = json.loads(out.strip().splitlines()[-1])
        assert counts["loaded"] > 0 and counts["refused"] > 0, counts
        assert counts["loaded"] + counts["refused"] == FUZZ_CASES[counts["format"]], counts
        with capsys.disabled():
            print("\nfuzz:", counts)
