"""Fuzzing the torch reader: run as a script by test_torch_reader.py, under an address-space limit.

    python torch_fuzz.py legacy|zip COUNT SEED LITE0_FILE

Makes COUNT seeded mutations of the real Lite0 file (legacy format as shipped, or re-packed into torch's zip
layout): bit flips and random bytes in the pickles, bit flips anywhere, truncations. Each must either load
(every array a numpy array of the shape its tensor declares) or end in the reader's own one-line
TorchFileError. Prints one JSON line of counts; on any other outcome prints the cases (seed, mutation,
position, traceback) to stderr and exits 1. The reader module is loaded from its file, so neither TensorFlow
nor the rest of the package is imported and the memory limit applies to the reader alone.
"""
import importlib.util
import io
import itertools
import json
import os
import pickletools
import random
import resource
import sys
import time
import traceback
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READER = os.path.join(REPO, "effnet_exp", "model", "pretrained", "torch_pickle.py")
# Address space allowed beyond what the process holds once the inputs are built.
HEADROOM = 512 << 20
MAX_FAILURES = 5


def load_reader():
    sys.path.insert(0, REPO)
    spec = importlib.util.spec_from_file_location("torch_pickle_under_fuzz", READER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pickles_end(data):
    """Offset past the five pickles that open a legacy file."""
    f = io.BytesIO(data)
    for _ in range(5):
        for _ in pickletools.genops(f):
            pass
    return f.tell()


def zip_parts(reader, legacy):
    """(zip of the storages, data.pkl): the legacy file's state dict in torch's zip layout."""
    _, storages = reader._read_legacy(legacy, "lite0")
    f = io.BytesIO(legacy)
    for _ in range(3):
        for _ in pickletools.genops(f):
            pass
    start = f.tell()
    for _ in pickletools.genops(f):
        pass
    pkl = legacy[start:f.tell()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/byteorder", b"little")
        for key, storage in storages.items():
            z.writestr("archive/data/" + key, storage.data.tobytes())
        z.writestr("archive/version", b"3\n")
    return out.getvalue(), pkl


def with_data_pkl(base, pkl):
    """The storages' zip with data.pkl appended (only data.pkl and the directory are written anew)."""
    buf = io.BytesIO(base)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
    return buf.getvalue()


def flip(data, pos, bit):
    return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]


def put(data, pos, value):
    return data[:pos] + bytes([value]) + data[pos + 1:]


def mutate(rng, data, region):
    """-> (description, mutated bytes); region: the length of the small, structural head of data."""
    kind = rng.random()
    if kind < 0.6:
        pos, bit = rng.randrange(region), rng.randrange(8)
        return "flip pos=%d bit=%d" % (pos, bit), flip(data, pos, bit)
    if kind < 0.75:
        pos, value = rng.randrange(region), rng.randrange(256)
        return "byte pos=%d value=%d" % (pos, value), put(data, pos, value)
    if kind < 0.85:
        pos, bit = rng.randrange(len(data)), rng.randrange(8)
        return "raw flip pos=%d bit=%d" % (pos, bit), flip(data, pos, bit)
    size = rng.randrange(region) if rng.random() < 0.7 else rng.randrange(len(data))
    return "truncate to %d" % size, data[:size]


def cases(fmt, count, seed, reader, lite0):
    """Yields (label, file bytes)."""
    rng = random.Random(seed)
    if fmt == "legacy":
        region = pickles_end(lite0)
        for i in range(count):
            what, data = mutate(rng, lite0, region)
            yield "legacy seed=%d case=%d %s" % (seed, i, what), data
        return
    base, pkl = zip_parts(reader, lite0)
    for i in range(count):
        if rng.random() < 0.7:
            what, mutated = mutate(rng, pkl, len(pkl))
            yield "zip seed=%d case=%d data.pkl %s" % (seed, i, what), with_data_pkl(base, mutated)
        else:
            whole = with_data_pkl(base, pkl)
            what, data = mutate(rng, whole, len(whole))
            yield "zip seed=%d case=%d whole file %s" % (seed, i, what), data


def check(reader, label, data, declared):
    """-> 'loaded' or 'refused'; raises AssertionError for any other outcome."""
    declared.clear()
    try:
        out = reader.load_state_dict_from_bytes(data, label)
    except reader.TorchFileError as err:
        assert "\n" not in str(err), "a multi-line error: %r" % str(err)
        return "refused"
    except Exception:
        raise AssertionError(traceback.format_exc(limit=4))
    assert list(out) == list(declared), "names %r, declared %r" % (list(out)[:3], list(declared)[:3])
    for name, value in out.items():
        assert type(value) is np.ndarray, "%s is a %s" % (name, type(value).__name__)
        assert value.shape == declared[name], "%s has shape %r, declared %r" % (name, value.shape, declared[name])
    return "loaded"


def record_shapes(reader, declared):
    """Wraps the reader's materialisation so that each tensor's declared size is noted."""
    materialise = reader._materialise

    def recording(ref, source, name, budget):
        declared[name] = ref.size
        return materialise(ref, source, name, budget)

    reader._materialise = recording


def limit_address_space():
    with open("/proc/self/status") as f:
        vm_kb = [int(line.split()[1]) for line in f if line.startswith("VmSize:")][0]
    limit = vm_kb * 1024 + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def main(argv):
    fmt, count, seed, path = argv[0], int(argv[1]), int(argv[2]), argv[3]
    reader = load_reader()
    with open(path, "rb") as f:
        lite0 = f.read()
    declared = {}
    record_shapes(reader, declared)
    generated = cases(fmt, count, seed, reader, lite0)
    first = next(generated)
    limit = limit_address_space()
    counts = {"loaded": 0, "refused": 0}
    failures = []
    start = time.time()
    for label, data in itertools.chain([first], generated):
        try:
            counts[check(reader, label, data, declared)] += 1
        except AssertionError as err:
            failures.append("%s\n%s" % (label, err))
            if len(failures) >= MAX_FAILURES:
                break
    counts.update(format=fmt, seconds=round(time.time() - start, 2), address_space_limit_mb=limit >> 20)
    print(json.dumps(counts))
    if failures:
        sys.stderr.write("\n\n".join(failures) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
