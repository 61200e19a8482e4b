"""A tiny ONNX model written as protobuf bytes by hand, so that the runtime needs no `onnx` package.

gather_model(count, dtype, axis): inputs `indices` (int64 [n]) and x0..x{count-1}; outputs y{i} = Gather(x{i},
indices, axis). The session uses it to reorder device-resident cache rows (beams, axis 0) and to cut positions
(rewind, axis 2) without a trip through host memory.
Field numbers are those of onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto, ValueInfoProto, TypeProto).
"""

from __future__ import annotations

import numpy as np

IR_VERSION = 8
OPSET = 17
ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.int64): 7, np.dtype(np.float16): 10}
ATTRIBUTE_INT = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes(number: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor_value(name: str, element_type: int, dims: tuple[str, ...]) -> bytes:
    """ValueInfoProto{name, type: TypeProto{tensor_type: {elem_type, shape: symbolic dims}}}."""
    shape = b"".join(_bytes(1, _bytes(2, dim)) for dim in dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, _int(1, element_type) + _bytes(2, shape)))


def gather_model(count: int, dtype: type, axis: int) -> bytes:
    """Serialized ModelProto of `count` parallel Gathers along `axis` over one shared `indices` input."""
    element = ELEMENT_TYPES[np.dtype(dtype)]
    attribute = _bytes(5, _bytes(1, "axis") + _int(3, axis) + _int(20, ATTRIBUTE_INT))
    graph = b"".join(
        _bytes(1, _bytes(1, f"x{i}") + _bytes(1, "indices") + _bytes(2, f"y{i}") + _bytes(4, "Gather") + attribute)
        for i in range(count)
    )
    graph += _bytes(2, f"gather_axis_{axis}")
    cache = ("batch", "heads", "length", "head_dim")
    gathered = (*cache[:axis], "picked", *cache[axis + 1 :])
    graph += _bytes(11, _tensor_value("indices", ELEMENT_TYPES[np.dtype(np.int64)], ("picked",)))
    graph += b"".join(_bytes(11, _tensor_value(f"x{i}", element, cache)) for i in range(count))
    graph += b"".join(_bytes(12, _tensor_value(f"y{i}", element, gathered)) for i in range(count))
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(2, "gpt2onnx") + _bytes(7, graph) + _bytes(8, opset)
