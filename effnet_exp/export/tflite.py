"""TFLite: the frozen graph converted with TensorFlow's own converter, and what a .tflite file holds.

Both stacks convert from the frozen GraphDef through `tf.compat.v1.lite.TFLiteConverter.from_frozen_graph`
(TF 1.15: TOCO, which runs the `toco_from_protos` program installed beside the Python interpreter; TF 2.x: the
MLIR converter). The input is converted with batch 1 (or export.batch_size).
"""
import contextlib
import os
import struct
import sys

import numpy as np
import tensorflow as tf

from effnet_exp.errors import UserError
from effnet_exp.export.config import Int8IO, Quantize

_IO_TYPES = {Int8IO.uint8: tf.uint8, Int8IO.int8: tf.int8}

# tflite's BuiltinOperator codes (schema.fbs; stable across versions) of the ops these models convert to.
BUILTIN_OPS = {
    0: "ADD", 1: "AVERAGE_POOL_2D", 2: "CONCATENATION", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 6: "DEQUANTIZE",
    9: "FULLY_CONNECTED", 14: "LOGISTIC", 18: "MUL", 19: "RELU", 21: "RELU6", 22: "RESHAPE", 25: "SOFTMAX",
    34: "PAD", 40: "MEAN", 41: "SUB", 43: "SQUEEZE", 45: "STRIDED_SLICE", 53: "CAST", 55: "MAXIMUM", 57: "MINIMUM",
    74: "SUM", 75: "SQRT", 76: "RSQRT", 78: "POW", 83: "PACK", 99: "SQUARED_DIFFERENCE", 114: "QUANTIZE",
    117: "HARD_SWISH",
}


@contextlib.contextmanager
def _converter_programs():
    """TF 1.15's converter runs `toco_from_protos` by name: the one installed beside this Python interpreter
    (a virtual environment's bin/) must be found even when that environment is not activated."""
    old = os.environ.get("PATH")
    here = os.path.dirname(os.path.abspath(sys.executable))
    os.environ["PATH"] = here + (os.pathsep + old if old else "")
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


def convert(frozen_path, quantize, image_size, batch_size, input_name, output_names, calibration=None,
            int8_io=Int8IO.float):
    """The .tflite bytes of the frozen graph at frozen_path. calibration: float32 images [N, S, S, 3] in the
    graph's input scale, required for int8."""
    quantize = Quantize(quantize)
    batch = int(batch_size or 1)
    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        frozen_path, [input_name], list(output_names), {input_name: [batch, image_size, image_size, 3]})
    if quantize != Quantize.none:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == Quantize.fp16:
        converter.target_spec.supported_types = [tf.float16]
    if quantize == Quantize.int8:
        if calibration is None or not len(calibration):
            raise ValueError("int8 needs calibration images")
        converter.representative_dataset = _representative(calibration, batch)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        io_type = _IO_TYPES.get(Int8IO(int8_io))
        if io_type is not None:
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
    try:
        with _converter_programs():
            return converter.convert()
    except Exception as err:  # the converters raise their own (private) error classes
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise UserError("export.quantize={}: TensorFlow {}'s TFLite converter failed: {}".format(
            quantize.value, tf.__version__, reason))


def _representative(images, batch):
    def batches():
        for start in range(0, len(images) - batch + 1, batch):
            yield [np.asarray(images[start:start + batch], np.float32)]
    return batches


def interpreter(model_content, threads=0):
    """tf.lite.Interpreter over the bytes; threads > 0 where the stack can set it (TF 1.15's cannot).
    Returns (interpreter, the threads it was given or None for the interpreter's default)."""
    if threads and _has_num_threads():
        return tf.lite.Interpreter(model_content=model_content, num_threads=int(threads)), int(threads)
    return tf.lite.Interpreter(model_content=model_content), None


def _has_num_threads():
    return "num_threads" in tf.lite.Interpreter.__init__.__code__.co_varnames


class TFLiteRunner(object):
    """Runs a .tflite model on float images [B, S, S, 3] (in its input scale): float32 outputs by name,
    dequantized when the file's outputs are integers. The images go through in chunks of the file's own batch
    (the last one padded), never by resizing the input: TF 1.15's int8 kernels give wrong results for the
    images after the first when the interpreter is resized to a larger batch."""

    def __init__(self, model_content, threads=0):
        self.interpreter, self.threads = interpreter(model_content, threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = {_base_name(d["name"]): d for d in self.interpreter.get_output_details()}
        self.batch = int(self.input["shape"][0])

    def set_input(self, images):
        """One chunk of exactly the file's batch."""
        self.interpreter.set_tensor(self.input["index"], quantize_array(np.asarray(images, np.float32), self.input))

    def invoke(self):
        self.interpreter.invoke()

    def output(self, name):
        details = self.outputs[name]
        return dequantize_array(self.interpreter.get_tensor(details["index"]), details)

    def __call__(self, images, name):
        images = np.asarray(images, np.float32)
        results = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            count = len(chunk)
            if count < self.batch:
                chunk = np.concatenate([chunk, np.zeros((self.batch - count,) + chunk.shape[1:], np.float32)])
            self.set_input(chunk)
            self.invoke()
            results.append(self.output(name)[:count])
        return np.concatenate(results)


def _base_name(name):
    return name.split(":", 1)[0]


def quantize_array(values, details):
    """Float values in the dtype of a tensor's details (its scale and zero point when it is an integer)."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return values.astype(dtype)
    scale, zero = details["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(values / scale + zero), info.min, info.max).astype(dtype)


def dequantize_array(values, details):
    if np.dtype(details["dtype"]).kind == "f":
        return values.astype(np.float32)
    scale, zero = details["quantization"]
    return ((values.astype(np.float32) - zero) * scale).astype(np.float32)


def tensor_entries(details):
    """export.json's view of interpreter tensor details."""
    entries = []
    for d in details:
        scale, zero = d["quantization"]
        entries.append({"name": _base_name(d["name"]), "dtype": np.dtype(d["dtype"]).name,
                        "shape": [int(v) for v in d["shape"]],
                        "quantization": {"scale": float(scale), "zero_point": int(zero)} if scale else None})
    return entries


def describe(model_content):
    """Input / output details (dtype, shape, quantization) and the op types of a .tflite file."""
    runner, _ = interpreter(model_content)
    runner.allocate_tensors()
    return {"inputs": tensor_entries(runner.get_input_details()),
            "outputs": tensor_entries(runner.get_output_details()),
            "op_types": op_types(model_content)}


def op_types(model_content):
    """Sorted op names of a .tflite flatbuffer (its Model.operator_codes), read without TFLite's schema
    module (TF 1.15 has none): builtin codes by BUILTIN_OPS (else BUILTIN_<code>), custom ops by name."""
    buf = bytes(model_content)
    model = _table(buf, _u32(buf, 0))
    codes = model.vector(1)
    names = set()
    for position in codes:
        code = _table(buf, position)
        custom = code.string(1)
        builtin = max(code.scalar(0, "<b", 0), code.scalar(3, "<i", 0))
        names.add(custom if custom else BUILTIN_OPS.get(builtin, "BUILTIN_{}".format(builtin)))
    return sorted(names)


def _u32(buf, at):
    return struct.unpack_from("<I", buf, at)[0]


class _table(object):
    """A flatbuffer table at a position: its fields by index through the vtable."""

    def __init__(self, buf, position):
        self.buf = buf
        self.position = position
        self.vtable = position - struct.unpack_from("<i", buf, position)[0]
        self.vtable_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, index):
        slot = 4 + 2 * index
        if slot >= self.vtable_size:
            return 0
        return struct.unpack_from("<H", self.buf, self.vtable + slot)[0]

    def scalar(self, index, fmt, default):
        offset = self._field(index)
        return struct.unpack_from(fmt, self.buf, self.position + offset)[0] if offset else default

    def _target(self, index):
        offset = self._field(index)
        if not offset:
            return None
        at = self.position + offset
        return at + _u32(self.buf, at)

    def vector(self, index):
        """Positions of the tables a vector-of-tables field points to."""
        start = self._target(index)
        if start is None:
            return []
        items = start + 4
        return [items + 4 * i + _u32(self.buf, items + 4 * i) for i in range(_u32(self.buf, start))]

    def string(self, index):
        start = self._target(index)
        if start is None:
            return None
        length = _u32(self.buf, start)
        return self.buf[start + 4:start + 4 + length].decode("utf-8", "replace")
