"""An ONNX model's graph, shapes and types without its weights: memory follows the graph's size.

``onnx.load`` reads the whole file and parses every weight into memory (a 1.5 GB model took
8 GB to inspect once checked and shape-inferred). :func:`read_skeleton` walks the protobuf wire
format over a memory map instead, copying every field except the data of large tensors: each
tensor whose serialized size is over ``keep_bytes`` (initializers, sparse initializers, constant
attributes, in every graph, subgraph, function and training graph) keeps its name, type and
shape, and its data becomes a reference (``data_location = EXTERNAL``, location
:data:`SKELETON_LOCATION`, with the offset of the bytes in the file and their length). Smaller
tensors (the shape and axis constants shape inference reads) are copied whole, so for a model
whose tensors are all small the skeleton is exactly ``onnx.load(path, load_external_data=False)``.

The weights' pages of the file are never touched. What needs the weights (running the model,
its numeric checks) happens in the worker, which loads the model through ``pipelines.engines``.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

#: The external-data location that marks a tensor whose data the skeleton did not read.
SKELETON_LOCATION = "__r1_skeleton_weights_not_read__"

#: Tensors up to this serialized size are copied whole (shape constants, small biases).
KEEP_TENSOR_BYTES = 4096

#: Bounds on the work a crafted file can ask for: fields visited, message nesting.
MAX_FIELDS = 10_000_000
MAX_DEPTH = 64

_WALKED = ("ModelProto", "GraphProto", "NodeProto", "AttributeProto", "SparseTensorProto",
           "FunctionProto", "TrainingInfoProto", "TensorProto")  # fmt: skip
_DATA_FIELDS = frozenset(
    TensorProto.DESCRIPTOR.fields_by_name[name].number
    for name in (
        "float_data",
        "int32_data",
        "string_data",
        "int64_data",
        "raw_data",
        "double_data",
        "uint64_data",
    )
)
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
_FOUR_BIT = {"INT4", "UINT4", "FLOAT4E2M1"}


def _walked_children() -> dict[str, dict[int, str]]:
    """For each message the reader walks, its fields whose message it walks too."""
    children: dict[str, dict[int, str]] = {}
    for name in _WALKED:
        descriptor = getattr(onnx, name).DESCRIPTOR
        children[name] = {
            field.number: field.message_type.name
            for field in descriptor.fields
            if field.message_type is not None and field.message_type.name in _WALKED
        }
    return children


_CHILDREN = _walked_children()


class SkeletonError(ValueError):
    """The bytes are not a well-formed ONNX protobuf (truncated, a bad tag, too deep)."""


@dataclass
class Skeleton:
    model: onnx.ModelProto
    stripped_tensors: int  # how many tensors lost their data
    stripped_bytes: int  # how many bytes of tensor data were not read


def is_stripped(tensor: TensorProto) -> bool:
    """True for a tensor whose data :func:`read_skeleton` left in the file."""
    return any(e.key == "location" and e.value == SKELETON_LOCATION for e in tensor.external_data)


def read_skeleton(path: Path, keep_bytes: int = KEEP_TENSOR_BYTES) -> Skeleton:
    """The ModelProto at ``path`` with the data of tensors over ``keep_bytes`` left unread.

    Raises SkeletonError when the file is not a well-formed protobuf, and DecodeError when
    protobuf itself refuses the skeleton.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise SkeletonError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            walker = _Walker(buf, keep_bytes)
            out = bytearray()
            walker.copy(0, size, "ModelProto", out, 0)
    model = onnx.ModelProto()
    model.ParseFromString(bytes(out))
    return Skeleton(model, walker.stripped_tensors, walker.stripped_bytes)


class _Walker:
    def __init__(self, buf: mmap.mmap, keep_bytes: int) -> None:
        self.buf, self.keep = buf, keep_bytes
        self.fields = 0
        self.stripped_tensors = 0
        self.stripped_bytes = 0

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise SkeletonError(f"a malformed varint at byte {pos} (the file may be truncated)")
            byte = self.buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields_of(self, start: int, end: int):
        """(number, wire type, field start, payload start, field end) for each field."""
        pos = start
        while pos < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise SkeletonError(f"the model has over {MAX_FIELDS} protobuf fields")
            field_start = pos
            tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if number == 0:
                raise SkeletonError(f"field number 0 at byte {field_start}")
            if wire == 0:
                _, pos = self.varint(pos, end)
                payload = field_start
            elif wire in (1, 5):
                payload, pos = pos, pos + (8 if wire == 1 else 4)
            elif wire == 2:
                length, payload = self.varint(pos, end)
                pos = payload + length
            else:
                raise SkeletonError(f"unsupported wire type {wire} at byte {field_start}")
            if pos > end:
                raise SkeletonError(f"a field at byte {field_start} runs past its message's end")
            yield number, wire, field_start, payload, pos

    def copy(self, start: int, end: int, kind: str, out: bytearray, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise SkeletonError(f"messages nested over {MAX_DEPTH} deep")
        children = _CHILDREN[kind]
        for number, wire, field_start, payload, field_end in self.fields_of(start, end):
            child = children.get(number) if wire == 2 else None
            if child is None or field_end - payload <= self.keep:
                out += self.buf[field_start:field_end]
                continue
            sub = bytearray()
            if child == "TensorProto":
                self.tensor(payload, field_end, sub)
            else:
                self.copy(payload, field_end, child, sub, depth + 1)
            out += _encode_varint((number << 3) | 2) + _encode_varint(len(sub)) + sub

    def tensor(self, start: int, end: int, out: bytearray) -> None:
        """A large tensor: everything but its data; the data becomes a reference."""
        head = bytearray()
        data: list[tuple[int, int, int]] = []  # (field number, payload start, payload end)
        for number, _wire, field_start, payload, field_end in self.fields_of(start, end):
            if number in _DATA_FIELDS:
                data.append((number, payload, field_end))
            else:
                head += self.buf[field_start:field_end]
        tensor = TensorProto()
        tensor.ParseFromString(bytes(head))
        if not data or tensor.data_type == TensorProto.STRING:
            out += self.buf[start:end]  # nothing to leave out, or strings (rare: kept)
            return
        expected = _raw_size(tensor)
        fields = {number for number, _, _ in data}
        if fields == {_RAW_DATA}:
            got = sum(stop - begin for _, begin, stop in data)
            if expected is not None and got != expected:
                raise SkeletonError(
                    f"tensor {tensor.name[:60]!r} has {got} bytes of data but its shape and "
                    f"type need {expected}"
                )
        elif len(fields) > 1:
            raise SkeletonError(f"tensor {tensor.name[:60]!r} holds its data in several fields")
        length = expected if expected is not None else data[0][2] - data[0][1]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", SKELETON_LOCATION),
            ("offset", str(data[0][1])),
            ("length", str(length)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.stripped_tensors += 1
        self.stripped_bytes += sum(stop - begin for _, begin, stop in data)
        out += tensor.SerializeToString()


def _raw_size(tensor: TensorProto) -> int | None:
    """The bytes the tensor's data takes as raw_data, from its shape and type."""
    try:
        name = TensorProto.DataType.Name(tensor.data_type)
        numel = math.prod(int(d) for d in tensor.dims)
        if name in _FOUR_BIT:
            return (numel + 1) // 2
        return numel * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (ValueError, KeyError, TypeError):
        return None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
