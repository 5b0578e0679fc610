"""ONNX inspection: parse, check and describe a model without running it."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from pipelines.core import ModelFormat, Precision, TensorSpec
from pipelines.formats.errors import ModelInfo, RejectedUpload
from pipelines.onnx_skeleton import SKELETON_LOCATION, is_stripped, read_skeleton

#: Operator domains onnxruntime implements; a node in any other domain needs a custom-op library.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})

#: Operators only quantized graphs use (besides every "QLinear*" operator).
INT8_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QAttention",
        "DynamicQuantizeLSTM",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
    }
)

#: A protobuf message cannot exceed 2 GiB, so a bigger single-file ONNX model cannot exist.
MAX_ONNX_BYTES = 2**31 - 1

_FLOATS = ("float32", "float16", "bfloat16", "float64")


def _invalid(reason: str) -> RejectedUpload:
    return RejectedUpload(f"not a valid ONNX model: {reason}", code="invalid_onnx")


def _clip(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def load_model(path: Path) -> onnx.ModelProto:
    """Parse ``path`` as a binary ModelProto without its weights, never following external data.

    The graph, types and shapes are read; the data of large tensors stays in the file (see
    :mod:`pipelines.onnx_skeleton`), so memory follows the graph's size, not the weights'.
    Raises SkeletonError or DecodeError when the bytes are not a ModelProto.
    """
    return read_skeleton(path).model


def looks_like_model(model: onnx.ModelProto) -> bool:
    return model.HasField("graph") and len(model.graph.node) > 0


# -- walking every graph, node and tensor ----------------------------------------------------------


def _subgraphs(nodes: Any) -> Iterator[onnx.GraphProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graph_and_subgraphs(attr.g)
            for g in attr.graphs:
                yield from _graph_and_subgraphs(g)


def _graph_and_subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    yield from _subgraphs(graph.node)


def iter_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, training graphs, and every subgraph (If/Loop/Scan bodies) inside them."""
    yield from _graph_and_subgraphs(model.graph)
    for info in model.training_info:
        yield from _graph_and_subgraphs(info.initialization)
        yield from _graph_and_subgraphs(info.algorithm)
    for function in model.functions:
        yield from _subgraphs(function.node)


def iter_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    for graph in iter_graphs(model):
        yield from graph.node
    for function in model.functions:
        yield from function.node


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto in the model: initializers, sparse initializers, constant attributes."""
    for graph in iter_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in iter_nodes(model):
        yield from _node_tensors(node)


def _is_external(tensor: onnx.TensorProto) -> bool:
    """Data in another file (a tensor whose data the skeleton left in this file is not)."""
    if is_stripped(tensor):
        return False
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in iter_tensors(model) if _is_external(t)]


def _location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return ""


# -- external data (zip uploads) ------------------------------------------------------------------


def check_external_data(model_proto: onnx.ModelProto, model_dir: Path) -> list[Path]:
    """Check every external-data reference of ``model_proto`` against ``model_dir``.

    Refuses (RejectedUpload) a location that is empty, absolute (POSIX or Windows, drive or UNC),
    uses backslashes, contains a ".." component, passes through a symlink, resolves outside
    ``model_dir``, is missing, or whose offset/length do not fit the file. Returns the resolved
    files referenced, sorted; reads no tensor data.
    """
    base = Path(model_dir).resolve(strict=True)
    found: set[Path] = set()
    for tensor in external_tensors(model_proto):
        where = f"tensor {tensor.name[:60]!r}"
        fields = {e.key: e.value for e in tensor.external_data}
        location = fields.get("location", "")
        shown = location[:80]

        def refuse(why: str, shown: str = shown, where: str = where) -> RejectedUpload:
            return RejectedUpload(
                f"external data of {where} at {shown!r} is refused: {why}", code="external_data"
            )

        if not location:
            raise refuse("it names no file")
        if "\x00" in location:
            raise refuse("the location contains a NUL byte")
        if (
            location.startswith(("/", "\\"))
            or PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive
        ):
            raise refuse("absolute paths are not allowed")
        parts = re.split(r"[\\/]", location)
        if ".." in parts:
            raise refuse("'..' would leave the model's folder")
        if "\\" in location:
            raise refuse("use '/' as the path separator")
        current = base
        for part in PurePosixPath(location).parts:
            current = current / part
            if current.is_symlink():
                raise refuse("symlinks are not allowed")
        resolved = (base / location).resolve()
        if not resolved.is_relative_to(base):
            raise refuse("it resolves outside the model's folder")
        if not resolved.is_file():
            raise refuse("the file is missing from the upload")
        size = resolved.stat().st_size
        try:
            offset = int(fields.get("offset", "0"))
            length = int(fields["length"]) if "length" in fields else size - offset
        except ValueError:
            raise refuse("offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise refuse(f"offset {offset} + length {length} do not fit the file ({size} bytes)")
        found.add(resolved)
    return sorted(found)


# -- the checker, without the weights ------------------------------------------------------------


def check_skeleton(model: onnx.ModelProto) -> None:
    """``onnx.checker`` on a model read by :func:`load_model`: every check but the weights' bytes.

    The checker wants the file an external tensor names to exist and to be large enough: the
    skeleton's references get one sparse file of the right size (no disk used), each offset read
    as 0, next to a copy of the skeleton; so do the references of a model uploaded with its
    external data (checked against the real files first by :func:`check_external_data`).
    Raises ``onnx.checker.ValidationError``.
    """
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    needed = 0
    for tensor in iter_tensors(model_copy):
        if _is_external(tensor):  # real external data, already checked by check_external_data
            fields = {e.key: e.value for e in tensor.external_data}
            del tensor.external_data[:]
            for key in ("location", "offset", "length"):
                entry = tensor.external_data.add()
                entry.key = key
                entry.value = SKELETON_LOCATION if key == "location" else fields.get(key, "0")
        if is_stripped(tensor):
            for entry in tensor.external_data:
                if entry.key == "offset":
                    entry.value = "0"
                elif entry.key == "length":
                    needed = max(needed, int(entry.value))
    with tempfile.TemporaryDirectory(prefix="r1-onnx-check-") as folder:
        with open(Path(folder) / SKELETON_LOCATION, "wb") as placeholder:
            placeholder.truncate(needed)
        path = Path(folder) / "skeleton.onnx"
        path.write_bytes(model_copy.SerializeToString())
        onnx.checker.check_model(str(path))


# -- description --------------------------------------------------------------------------------


def dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type ("float32", "int64", ...); strings are "str"."""
    if elem_type == onnx.TensorProto.STRING:
        return "str"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return "undefined"


def _type_name(tp: onnx.TypeProto) -> str:
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        return dtype_name(tp.tensor_type.elem_type)
    if which == "sparse_tensor_type":
        return f"sparse({dtype_name(tp.sparse_tensor_type.elem_type)})"
    if which == "sequence_type":
        return f"sequence({_type_name(tp.sequence_type.elem_type)})"
    if which == "optional_type":
        return f"optional({_type_name(tp.optional_type.elem_type)})"
    if which == "map_type":
        key = dtype_name(tp.map_type.key_type)
        return f"map({key},{_type_name(tp.map_type.value_type)})"
    return "undefined"


def tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    """A ValueInfo as a TensorSpec: dim_value -> int, dim_param -> its name, unknown -> "?"."""
    tp = value.type
    shape: list[int | str] = []
    tensor = None
    if tp.WhichOneof("value") == "tensor_type":
        tensor = tp.tensor_type
    elif tp.WhichOneof("value") == "sparse_tensor_type":
        tensor = tp.sparse_tensor_type  # type: ignore[assignment]
    if tensor is not None and tensor.HasField("shape"):
        for dim in tensor.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param") and dim.dim_param:
                shape.append(str(dim.dim_param))
            else:
                shape.append("?")
    return TensorSpec(name=value.name, shape=shape, dtype=_type_name(tp))


def _numel(dims: Any) -> int:
    return math.prod(int(d) for d in dims) if len(dims) else 1


def _itemsize(name: str) -> float:
    bits = {"int4": 4, "uint4": 4, "float4_e2m1fn": 4, "bool": 8, "str": 0}
    if name in bits:
        return bits[name] / 8
    digits = re.search(r"(\d+)", name)
    return int(digits.group(1)) / 8 if digits else 0.0


def guess_precision(model: onnx.ModelProto, dtype_bytes: dict[str, int]) -> str:
    """int8 when quantization ops appear; fp16/bf16 when those initializers dominate; else fp32."""
    for node in iter_nodes(model):
        if node.op_type in INT8_OPS or node.op_type.startswith("QLinear"):
            return Precision.INT8.value
    floats = {k: v for k, v in dtype_bytes.items() if k in _FLOATS}
    total = sum(floats.values())
    if total:
        if floats.get("float16", 0) * 2 > total:
            return Precision.FP16.value
        if floats.get("bfloat16", 0) * 2 > total:
            return Precision.BF16.value
    return Precision.FP32.value


def inspect_onnx(path: Path, model: onnx.ModelProto, external_ok: bool = False) -> ModelInfo:
    """Validate and describe an already parsed ``model`` whose bytes are at ``path``.

    ``external_ok``: the model came in an archive whose external data the caller checked
    (:mod:`pipelines.formats.onnx_archive`); a single file that names other files is refused.
    """
    graph = model.graph
    if len(graph.node) == 0:
        raise _invalid("the graph has no nodes")

    external = external_tensors(model)
    if external and not external_ok:
        first = external[0]
        raise RejectedUpload(
            f"this ONNX model keeps {len(external)} tensor(s) in external data files (e.g. "
            f"{first.name[:60]!r} in {_location(first)[:60]!r}), which a single-file upload "
            "cannot carry: upload a zip or tar (.zip, .tar, .tar.gz) holding the .onnx file and "
            "its data files, as they sit beside it",
            code="external_data",
        )

    local_functions = {(f.domain, f.name) for f in model.functions}
    for node in iter_nodes(model):
        if (
            node.domain not in ALLOWED_DOMAINS
            and (node.domain, node.op_type) not in local_functions
        ):
            raise RejectedUpload(
                f"the model uses the custom operator {node.op_type[:60]!r} (domain "
                f"{node.domain[:60]!r}), which onnxruntime does not know: custom operators need a "
                "plugin library, which uploads cannot carry. Export the model with standard "
                "ONNX operators",
                code="custom_op",
            )

    try:
        check_skeleton(model)
    except (onnx.checker.ValidationError, RuntimeError, ValueError, DecodeError) as exc:
        raise _invalid(f"onnx.checker: {_clip(exc)}") from None

    initializer_names = {t.name for t in graph.initializer} | {
        s.values.name for s in graph.sparse_initializer
    }
    inputs = [tensor_spec(v) for v in graph.input if v.name not in initializer_names]
    if not inputs:
        raise RejectedUpload(
            "the model has no inputs (every graph input is a constant weight); "
            "export it with at least one input",
            code="no_inputs",
        )

    details: dict[str, Any] = {}
    outputs_graph = graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        outputs_graph = inferred.graph
        details["shape_inference"] = "ok"
    except Exception as exc:  # inference is best effort: the declared outputs still stand
        details["shape_inference"] = f"failed: {_clip(exc, 200)}"
    outputs = [tensor_spec(v) for v in outputs_graph.output]

    dtype_bytes: dict[str, int] = {}
    parameters = 0
    for tensor in graph.initializer:
        name = dtype_name(tensor.data_type)
        n = _numel(tensor.dims)
        parameters += n
        dtype_bytes[name] = dtype_bytes.get(name, 0) + int(n * _itemsize(name))
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    domains = sorted({n.domain or "ai.onnx" for n in iter_nodes(model)})
    details.update(
        {
            "ir_version": int(model.ir_version),
            "opset": opsets.get("ai.onnx"),
            "opsets": opsets,
            "producer_name": model.producer_name,
            "producer_version": model.producer_version,
            "node_count": len(graph.node),
            "total_node_count": sum(1 for _ in iter_nodes(model)),
            "local_functions": len(model.functions),
            "domains": domains,
            "initializer_count": len(graph.initializer),
            "parameter_count": parameters,
            "parameter_bytes": sum(dtype_bytes.values()),
            "initializer_dtypes": dtype_bytes,
        }
    )
    return ModelInfo(
        format=ModelFormat.ONNX.value,
        precision=guess_precision(model, dtype_bytes),
        inputs=inputs,
        outputs=outputs,
        details=details,
    )
