"""The Open Inference Protocol (KServe v2, what Triton speaks) over HTTP: tensors in and out.

A request's tensors come as JSON ``data`` (flattened row-major as the protocol says, or nested)
or, as Triton's clients send them by default, through the binary tensor data extension: the JSON
header is followed by raw little-endian bytes, ``Inference-Header-Content-Length`` giving the
header's length and each input's ``parameters.binary_data_size`` its share. Outputs are returned
the same way when asked (``parameters.binary_data`` on an output, ``binary_data_output`` on the
request). Anything malformed is a :class:`ProtocolError`, answered 400 with its message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from pipelines.core import TensorSpec

# numpy dtype name -> the protocol's datatype name. BYTES (strings) is not served.
DATATYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}
NUMPY_DTYPES: dict[str, str] = {kserve: name for name, kserve in DATATYPES.items()}

# What each model format is called in model metadata (Triton's platform names where it has one).
PLATFORMS: dict[str, str] = {
    "onnx": "onnxruntime_onnx",
    "tensorrt": "tensorrt_plan",
    "torchscript": "pytorch_libtorch",
    "aotinductor": "torch_aotinductor",
}

JSON_LENGTH_HEADER = "inference-header-content-length"


class ProtocolError(Exception):
    """A request that does not follow the protocol or does not fit the model; answered 400."""


def datatype(dtype: str) -> str:
    """The protocol's name for a numpy dtype name; ValueError for one it cannot carry."""
    try:
        return DATATYPES[dtype]
    except KeyError:
        raise ValueError(f"tensors of dtype {dtype} cannot be served") from None


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """An input or output as model metadata describes it: dynamic dims are -1."""
    shape = [dim if isinstance(dim, int) else -1 for dim in spec.shape]
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": shape}


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    # The outputs asked for, in order, each with whether it goes back as binary (None: all).
    outputs: list[tuple[str, bool]] | None
    binary_outputs: bool  # the default for outputs not asked for by name


def parse_infer_request(body: bytes | bytearray, json_length: str | None) -> InferRequest:
    """A request body (and its ``Inference-Header-Content-Length`` header, if any) as arrays."""
    header, binary = _split_body(body, json_length)
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ProtocolError("the request body must be a JSON object")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError('"id" must be a string')
    entries = payload.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise ProtocolError('"inputs" must be a non-empty list of tensors')
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for entry in entries:
        name, kind, array, offset = _input_tensor(entry, binary, offset)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name], datatypes[name] = array, kind
    if offset != len(binary):
        raise ProtocolError(
            f"the body carries {len(binary)} bytes of binary tensor data but the inputs' "
            f"binary_data_size add up to {offset}"
        )
    binary_outputs = bool(_parameters(payload, "request").get("binary_data_output", False))
    return InferRequest(
        id=request_id,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_requested_outputs(payload.get("outputs"), binary_outputs),
        binary_outputs=binary_outputs,
    )


def check_request(request: InferRequest, inputs: Sequence[TensorSpec], outputs: list[str]) -> None:
    """Datatypes as the model declares them (as Triton, no silent casts) and known outputs.

    Names, ranks, dims and batch sizes are the engine's to check (``Engine.validate``).
    """
    declared = {spec.name: spec for spec in inputs}
    for name, kind in request.datatypes.items():
        spec = declared.get(name)
        if spec is not None and spec.dtype in DATATYPES and DATATYPES[spec.dtype] != kind:
            raise ProtocolError(
                f"input {name!r} is {kind} but the model takes {DATATYPES[spec.dtype]}"
            )
    for name, _ in request.outputs or []:
        if name not in outputs:
            raise ProtocolError(f"the model has no output {name!r}; its outputs are {outputs}")


def encode_infer_response(
    request: InferRequest,
    model_name: str,
    model_version: str,
    produced: dict[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (binary outputs follow the JSON, with its length)."""
    wanted = request.outputs or [(name, request.binary_outputs) for name in produced]
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        array = produced[name]
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatype(array.dtype.name),
            "shape": list(array.shape),
        }
        if binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = tensors
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", JSON_LENGTH_HEADER: str(len(header))}
    return b"".join([header, *chunks]), headers


def error_body(message: str) -> bytes:
    """The protocol's error form."""
    return orjson.dumps({"error": message})


# -- pieces ----------------------------------------------------------------------------------------


def _split_body(
    body: bytes | bytearray, json_length: str | None
) -> tuple[bytes | bytearray, memoryview]:
    if json_length is None:
        return body, memoryview(b"")
    try:
        length = int(json_length)
    except ValueError:
        raise ProtocolError("Inference-Header-Content-Length must be an integer") from None
    if not 0 < length <= len(body):
        raise ProtocolError(
            f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes"
        )
    view = memoryview(body)
    return bytes(view[:length]), view[length:]


def _parameters(entry: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(f'"parameters" of the {what} must be an object')
    return parameters


def _input_tensor(entry: Any, binary: memoryview, offset: int) -> tuple[str, str, np.ndarray, int]:
    if not isinstance(entry, dict):
        raise ProtocolError("each input must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("each input needs a string name")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers")
    kind = entry.get("datatype")
    if kind not in NUMPY_DTYPES or kind == "BF16":
        known = ", ".join(k for k in NUMPY_DTYPES if k != "BF16")
        raise ProtocolError(f"input {name!r}: datatype {kind!r} is not one of {known}")
    dtype = np.dtype(NUMPY_DTYPES[kind])
    count = math.prod(shape)
    size = _parameters(entry, f"input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise ProtocolError(
                f"input {name!r}: binary_data_size is {size} but shape {shape} of {kind} takes "
                f"{count * dtype.itemsize} bytes"
            )
        if offset + size > len(binary):
            raise ProtocolError(f"input {name!r}: the body ends before its binary data does")
        chunk = binary[offset : offset + size]
        array = np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
        return name, kind, array.reshape(shape), offset + size
    if "data" not in entry:
        raise ProtocolError(f"input {name!r} has no data")
    array = _json_array(name, entry["data"], kind, dtype)
    if array.size != count:
        raise ProtocolError(
            f"input {name!r}: shape {shape} holds {count} values but data has {array.size}"
        )
    return name, kind, array.reshape(shape), offset


def _json_array(name: str, data: Any, kind: str, dtype: np.dtype[Any]) -> np.ndarray:
    """JSON values as ``dtype``, refusing any that would change (1.5 as INT64, 1e40 as FP32)."""
    try:
        raw = np.asarray(data)
    except ValueError:
        raise ProtocolError(f"input {name!r}: data is a ragged nested list") from None
    if raw.size == 0:
        return raw.astype(dtype)
    accepted = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if raw.dtype.kind not in accepted:
        raise ProtocolError(f"input {name!r}: data of {kind} must be {_describe(dtype.kind)}")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"input {name!r}: values outside the range of {kind}")
    with np.errstate(over="ignore"):
        array = raw.astype(dtype)
    if dtype.kind == "f" and not np.array_equal(np.isfinite(raw), np.isfinite(array)):
        raise ProtocolError(f"input {name!r}: values beyond the range of {kind}")
    return array


def _describe(kind: str) -> str:
    return {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}[kind]


def _requested_outputs(entries: Any, default_binary: bool) -> list[tuple[str, bool]] | None:
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ProtocolError('"outputs" must be a list of {"name": ...}')
    wanted: list[tuple[str, bool]] = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ProtocolError('each requested output must be an object with a string "name"')
        binary = _parameters(entry, f"output {entry['name']!r}").get("binary_data", default_binary)
        wanted.append((entry["name"], bool(binary)))
    return wanted or None
