"""Block-string codec and width/depth scaling rules (pure Python, no TensorFlow).

A block string describes one stage of MBConv or fused-MBConv blocks, e.g.
``r2_k3_s22_e6_i16_o24_se0.25`` or (EfficientNetV2) ``r2_k3_s22_e4_i16_o32_c1``:

====== ===================================================== ========
field  meaning                                               required
====== ===================================================== ========
r<N>   number of repeats of the block in the stage            yes
k<N>   kernel size (depthwise conv; fused: the full conv)     yes
s<HW>  strides, exactly two digits (``s11``, ``s22``)         yes
e<N>   expansion ratio of the expand conv                     yes
i<N>   input filters of the stage                             yes
o<N>   output filters of the stage                            yes
se<F>  squeeze-excitation ratio in [0, 1]; absent/0 = no SE   no
c<N>   conv type: 0 MBConv (absent), 1 fused-MBConv           no
noskip disables the identity skip connection                  no
====== ===================================================== ========

A fused-MBConv block (EfficientNetV2, ``c1`` as in google/automl ``efficientnetv2/effnetv2_configs.py``)
replaces the 1x1 expand conv and the depthwise conv by one full ``k x k`` conv with the block's stride; with
expansion 1 that conv is the block's only (projecting) conv.

This module is the only place where block strings are decoded.
"""
import collections
import math
import re

__all__ = [
    "BlockArgs",
    "decode_block_string",
    "encode_block_string",
    "decode_blocks",
    "has_se",
    "is_fused",
    "round_filters",
    "round_repeats",
]

BlockArgs = collections.namedtuple(
    "BlockArgs",
    [
        "num_repeat",
        "kernel_size",
        "strides",
        "expand_ratio",
        "input_filters",
        "output_filters",
        "se_ratio",
        "id_skip",
        "conv_type",
    ],
)
BlockArgs.__new__.__defaults__ = (0,)  # conv_type: MBConv unless the string says c1

MBCONV = 0
FUSED_MBCONV = 1
CONV_TYPES = {MBCONV: "MBConv", FUSED_MBCONV: "Fused-MBConv"}

_REQUIRED = ("r", "k", "s", "e", "i", "o")
_FIELD_RE = re.compile(r"^(se|[rkseioc])([0-9.].*)$")
_NAMES = {
    "r": "num_repeat",
    "k": "kernel_size",
    "s": "strides",
    "e": "expand_ratio",
    "i": "input_filters",
    "o": "output_filters",
    "se": "se_ratio",
    "c": "conv_type",
}


def _bad(block_string, msg):
    return ValueError("Invalid block string %r: %s" % (block_string, msg))


def _positive_int(block_string, key, text):
    if not text.isdigit():
        raise _bad(
            block_string,
            "field '%s%s' (%s) must be a non-negative integer"
            % (key, text, _NAMES[key]),
        )
    value = int(text)
    if value <= 0:
        raise _bad(
            block_string,
            "field '%s%s' (%s) must be > 0" % (key, text, _NAMES[key]),
        )
    return value


def decode_block_string(block_string):
    """Parses a block string such as ``r2_k3_s22_e6_i16_o24_se0.25``.

    Returns a :class:`BlockArgs`. Raises ValueError naming the string and the
    offending field for unknown, duplicated, missing or malformed fields.
    """
    if not isinstance(block_string, str):
        raise ValueError(
            "Block string must be a str, got %r (%s)"
            % (block_string, type(block_string).__name__)
        )
    s = block_string.strip()
    if not s:
        raise _bad(block_string, "empty string")
    values = {}
    id_skip = True
    for token in s.split("_"):
        if token == "noskip":
            if not id_skip:
                raise _bad(block_string, "field 'noskip' given twice")
            id_skip = False
            continue
        m = _FIELD_RE.match(token)
        if m is None:
            raise _bad(block_string, "unknown field %r" % token)
        key, text = m.group(1), m.group(2)
        if key in values:
            raise _bad(
                block_string, "field '%s' (%s) given twice" % (key, _NAMES[key])
            )
        values[key] = text
    missing = [k for k in _REQUIRED if k not in values]
    if missing:
        raise _bad(
            block_string,
            "missing field(s) %s"
            % ", ".join("'%s' (%s)" % (k, _NAMES[k]) for k in missing),
        )

    strides_text = values["s"]
    if len(strides_text) != 2 or not strides_text.isdigit():
        raise _bad(
            block_string,
            "field 's%s' (strides) must be exactly two digits, e.g. s11 or s22"
            % strides_text,
        )
    strides = (int(strides_text[0]), int(strides_text[1]))
    if min(strides) <= 0:
        raise _bad(block_string, "field 's%s' (strides) must be > 0" % strides_text)

    se_ratio = None
    if "se" in values:
        try:
            se_ratio = float(values["se"])
        except ValueError:
            raise _bad(
                block_string,
                "field 'se%s' (se_ratio) must be a number" % values["se"],
            )
        if not 0.0 <= se_ratio <= 1.0:
            raise _bad(
                block_string,
                "field 'se%s' (se_ratio) must be in [0, 1]" % values["se"],
            )

    conv_type = MBCONV
    if "c" in values:
        if values["c"] not in ("0", "1"):
            raise _bad(block_string, "field 'c%s' (conv_type) must be c0 (MBConv) or c1 (fused-MBConv)"
                       % values["c"])
        conv_type = int(values["c"])

    return BlockArgs(
        num_repeat=_positive_int(block_string, "r", values["r"]),
        kernel_size=_positive_int(block_string, "k", values["k"]),
        strides=strides,
        expand_ratio=_positive_int(block_string, "e", values["e"]),
        input_filters=_positive_int(block_string, "i", values["i"]),
        output_filters=_positive_int(block_string, "o", values["o"]),
        se_ratio=se_ratio,
        id_skip=id_skip,
        conv_type=conv_type,
    )


def encode_block_string(args):
    """Inverse of :func:`decode_block_string`.

    ``decode_block_string(encode_block_string(a)) == a`` for every valid ``a``
    (``se`` is written whenever se_ratio is not None, including 0; ``c1`` for a fused block, nothing for MBConv).
    """
    strides = tuple(args.strides)
    if len(strides) != 2:
        raise ValueError("BlockArgs.strides must have 2 entries, got %r" % (args.strides,))
    parts = [
        "r%d" % args.num_repeat,
        "k%d" % args.kernel_size,
        "s%d%d" % strides,
        "e%d" % args.expand_ratio,
        "i%d" % args.input_filters,
        "o%d" % args.output_filters,
    ]
    if args.se_ratio is not None:
        parts.append("se%r" % float(args.se_ratio))
    if args.conv_type != MBCONV:
        parts.append("c%d" % args.conv_type)
    if not args.id_skip:
        parts.append("noskip")
    return "_".join(parts)


def decode_blocks(block_strings):
    """Decodes a list of block strings (any iterable, e.g. an OmegaConf ListConfig)."""
    return [decode_block_string(str(b)) for b in block_strings]


def has_se(args):
    """True when the block has a squeeze-excitation branch (0 < se_ratio <= 1)."""
    return args.se_ratio is not None and 0.0 < float(args.se_ratio) <= 1.0


def is_fused(args):
    """True for a fused-MBConv block (conv type 1)."""
    return args.conv_type == FUSED_MBCONV


def round_filters(filters, width_coefficient, depth_divisor=8, min_depth=None, min_ratio=0.9):
    """Scales a channel count by the width coefficient, rounded to the divisor.

    width_coefficient of None, 0 or 1.0 returns ``filters`` unchanged. The result is raised by one divisor when
    rounding took it below ``min_ratio`` of the scaled count: 0.9 in EfficientNet V1's code, no such rule (0) in
    EfficientNetV2's (google/automl effnetv2_model.py, keras.applications efficientnet_v2.py).
    """
    if not width_coefficient or float(width_coefficient) == 1.0:
        return int(filters)
    divisor = int(depth_divisor)
    scaled = filters * float(width_coefficient)
    min_depth = min_depth or divisor
    new_filters = max(min_depth, int(scaled + divisor / 2.0) // divisor * divisor)
    if new_filters < float(min_ratio) * scaled:
        new_filters += divisor
    return int(new_filters)


def round_repeats(repeats, depth_coefficient):
    """Scales a stage's repeat count by the depth coefficient (ceil)."""
    if not depth_coefficient:
        return int(repeats)
    return int(math.ceil(float(depth_coefficient) * repeats))
