"""Small ONNX / onnxruntime helpers the stages share: graph signatures, sizes, random inputs.

onnx and onnxruntime are imported inside the functions, so importing this module (the web process
does, to list stages) costs nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import PipelineError, TensorSpec

if TYPE_CHECKING:
    import onnxruntime

# onnxruntime executes in-process on the CPU here; naming the provider stops a CUDA build of
# onnxruntime from silently picking the GPU for what is meant to be the CPU path.
CPU_PROVIDERS = ["CPUExecutionProvider"]

# ONNX files above this size must keep their weights in external data (protobuf's 2 GiB limit);
# the margin leaves room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype named by a TensorSpec's ``dtype``, or a PipelineError naming it."""
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        raise PipelineError(
            f"unknown tensor dtype {dtype!r}: use a numpy name such as float32"
        ) from exc


def _elem_type_name(elem_type: int) -> str:
    import onnx

    try:
        return str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except Exception:  # a type numpy has no name for (bfloat16 without ml_dtypes, float8...)
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info_spec(value_info: Any) -> TensorSpec:
    name = value_info.name
    type_proto = value_info.type
    if type_proto.WhichOneof("value") != "tensor_type":
        # Sequences and maps have no single shape; keep the name so the signature stays complete.
        return TensorSpec(name=name, shape=[], dtype=str(type_proto.WhichOneof("value")))
    tensor_type = type_proto.tensor_type
    shape: list[int | str] = []
    for i, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        elif dim.dim_param:
            shape.append(dim.dim_param)
        else:
            # A dim with neither value nor name is still dynamic; give it a stable, unique name.
            shape.append(f"{name}_dim{i}")
    return TensorSpec(name=name, shape=shape, dtype=_elem_type_name(tensor_type.elem_type))


def read_tensor_specs(path: str | Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The graph inputs and outputs of an ONNX file, dims with a dim_param as strings.

    Initializers that older exporters also list as graph inputs are left out: they are weights,
    not something a caller feeds.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_value_info_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_value_info_spec(v) for v in model.graph.output]
    return inputs, outputs


def uses_external_data(path: str | Path) -> bool:
    """Whether an ONNX file keeps any initializer in an external data file."""
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(tensor_uses_external_data(t) for t in model.graph.initializer)


def external_data_files(path: str | Path) -> list[Path]:
    """The external data files an ONNX file refers to (relative to its folder)."""
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_uses_external_data

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    found: dict[str, Path] = {}
    for tensor in model.graph.initializer:
        if tensor_uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    found[entry.value] = path.parent / entry.value
    return list(found.values())


def copy_onnx(path: str | Path, folder: Path, name: str = "input.onnx") -> Path:
    """The ONNX file copied into ``folder`` with its external data files (same relative places).

    onnxruntime's quantizer writes ``<model>-inferred.onnx`` beside the file it is given, and
    removes it after: given a stored file, two jobs on one parent would write and delete the same
    file beside it. A job never writes beside a stored file, so it works on such a copy.
    """
    source = Path(path)
    copied = folder / name
    shutil.copyfile(source, copied)
    for data in external_data_files(source):
        target = folder / data.relative_to(source.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data, target)
    return copied


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file plus, for ONNX, the external data files it refers to."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".onnx":
        size += sum(f.stat().st_size for f in external_data_files(path) if f.exists())
    return size


def human_bytes(size: float) -> str:
    """``38.9 KB``, ``1.20 GB``: sizes for messages (powers of 1000, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"  # unreachable; keeps mypy's return check happy


def op_types(path: str | Path) -> list[str]:
    """The op type of every node of an ONNX graph's main body, in order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [node.op_type for node in model.graph.node]


def concrete_shapes(
    specs: Sequence[TensorSpec],
    batch_size: int,
    dim_sizes: Mapping[str, int] | None = None,
    default_dim: int = 1,
) -> list[list[int]]:
    """Replace every named (dynamic) dim of ``specs`` with a size.

    A named first dim is the batch and becomes ``batch_size``; so does that name anywhere else,
    since one name means one size across all inputs. Other names take ``dim_sizes`` or
    ``default_dim``. Fixed (int) dims stay as they are, the first one included: callers that need
    a particular batch check that themselves.
    """
    dim_sizes = dict(dim_sizes or {})
    batch_names = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    shapes: list[list[int]] = []
    for spec in specs:
        shape: list[int] = []
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                shape.append(dim)
            elif i == 0 or dim in batch_names:
                shape.append(batch_size)
            else:
                shape.append(int(dim_sizes.get(dim, default_dim)))
        shapes.append(shape)
    return shapes


def fixed_batch(specs: Sequence[TensorSpec]) -> int | None:
    """The batch size a model is fixed to (an int first dim on any input), or None if dynamic."""
    for spec in specs:
        if spec.shape and isinstance(spec.shape[0], int):
            return spec.shape[0]
    return None


def random_array(shape: Sequence[int], dtype: str, rng: np.random.Generator) -> np.ndarray:
    """Random data for one input: standard normal floats, ints in [0, 10), fair booleans.

    Ints stay small because integer inputs are usually indices (token ids, classes) that a model
    looks up, and 0..9 is in range for any vocabulary.
    """
    np_dtype = numpy_dtype(dtype)
    if np_dtype.kind == "f":
        return rng.standard_normal(size=tuple(shape)).astype(np_dtype)
    if np_dtype.kind in "iu":
        return rng.integers(0, 10, size=tuple(shape), dtype=np_dtype)
    if np_dtype.kind == "b":
        return rng.random(size=tuple(shape)) < 0.5
    raise PipelineError(f"cannot make random input data of dtype {dtype}")


def random_inputs(
    specs: Sequence[TensorSpec],
    batch_size: int,
    dim_sizes: Mapping[str, int] | None = None,
    default_dim: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random arrays for every input of ``specs``, keyed by name (see :func:`concrete_shapes`)."""
    rng = np.random.default_rng(seed)
    shapes = concrete_shapes(specs, batch_size, dim_sizes, default_dim)
    return {
        spec.name: random_array(shape, spec.dtype, rng)
        for spec, shape in zip(specs, shapes, strict=True)
    }


def describe_inputs(arrays: Mapping[str, np.ndarray]) -> str:
    """``[2, 64] float32`` for one input, ``x: [2, 64] float32, y: ...`` for several."""
    parts = {name: f"{list(a.shape)} {a.dtype}" for name, a in arrays.items()}
    if len(parts) == 1:
        return next(iter(parts.values()))
    return ", ".join(f"{name}: {text}" for name, text in parts.items())


def cpu_session(
    path: str | Path, options: onnxruntime.SessionOptions | None = None
) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU execution provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=options, providers=CPU_PROVIDERS)


def session_feeds(
    session: onnxruntime.InferenceSession, arrays: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The subset of ``arrays`` a session takes; a PipelineError if one it needs is missing.

    Exporters drop inputs the graph never reads, so a session may take fewer inputs than declared.
    """
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise PipelineError(
            f"the ONNX model needs input(s) {missing} that the artifact does not declare "
            f"(declared: {sorted(arrays)})"
        )
    return {n: arrays[n] for n in names}


def first_error_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong.

    TorchScript wraps errors in a multi-line interpreter traceback whose first line is always
    "The following operation failed in the TorchScript interpreter."; the cause is its last
    "SomethingError: ..." line. Other exceptions: their first non-empty line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        for line in reversed(lines):
            head = line.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) and " " not in head:
                return line
        return lines[-1]
    return lines[0]
