"""quantize: ONNX fp32 -> int8 (dynamic or static QDQ), fp16 or bf16, gated on accuracy retention.

Modes:

* ``int8_dynamic``: ``quantize_dynamic``; weights int8, activations quantized per batch at run
  time. No data needed.
* ``int8_static``: ``quantize_static`` in QDQ form (explicit QuantizeLinear/DequantizeLinear pairs,
  what TensorRT consumes now that its implicit INT8 calibrators are deprecated, and what
  onnxruntime runs), symmetric int8 weights and activations (TensorRT wants zero points of 0),
  weights per channel; activation ranges come from running the model over a calibration dataset.
* ``fp16``: ``convert_float_to_float16``; inputs and outputs stay float32 by default, so callers
  see the same contract.
* ``bf16``: the same conversion to bfloat16, kept only if a provider of this worker runs it.

When an evaluation dataset is known, the primary metric of the model's task is measured on the
parent and on the new model; a model that keeps less than ``min_retention`` of it is not
registered (unless ``keep_below_threshold``) and the parent stays the current artifact.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    ProgressFn,
    StageResult,
    StageSettings,
    timed_result,
)
from pipelines.onnx_io import (
    CPU_PROVIDERS,
    EXTERNAL_DATA_THRESHOLD,
    external_data_files,
    first_error_line,
    fixed_batch,
    human_bytes,
    model_size_bytes,
    op_types,
    random_inputs,
    read_tensor_specs,
    uses_external_data,
)
from pipelines.stages._common import ONNX_FILENAME, coerce_settings, require_format, settings_meta
from pipelines.staging import scratch_dir, staged_output

if TYPE_CHECKING:
    import onnx
    import onnxruntime

    from pipelines.calibration import SplitCalibrationReader
    from pipelines.core import DatasetRef
    from pipelines.datasets import SplitData

logger = logging.getLogger(__name__)

OpType = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64)]
Mode = Literal["int8_dynamic", "int8_static", "fp16", "bf16"]
CalibrateMethod = Literal["minmax", "entropy", "percentile"]

# The precision each mode leaves the model in.
MODE_PRECISION: dict[str, str] = {
    "int8_dynamic": Precision.INT8.value,
    "int8_static": Precision.INT8.value,
    "fp16": Precision.FP16.value,
    "bf16": Precision.BF16.value,
}
_INT8_MODES = ("int8_dynamic", "int8_static")
_FLOAT_MODES = ("fp16", "bf16")

# Ops that only appear in a graph once something was quantized dynamically: MatMulInteger,
# ConvInteger, DynamicQuantizeLinear, DequantizeLinear (quantized Gather), QAttention, QGemm, ...
_QUANTIZED_OP = re.compile(r"(?i:integer|quantize)|^Q[A-Z]")
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# "Could not find an implementation for Gemm(13) node with name '/0/Gemm'"
_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\)")
# Providers that run bf16 models; the CPU provider has almost no bf16 kernels.
_BF16_PROVIDERS = ("CUDAExecutionProvider",)
_EVAL_BATCH = 64


def _listed(names: list[str], verb: str) -> str:
    """``a applies`` / ``a, b apply``: setting names and a verb that agrees with them."""
    if len(names) == 1:
        verb = verb.replace("apply", "applies") if "apply" in verb else verb + "s"
    return f"{', '.join(names)} {verb}"


class QuantizeSettings(StageSettings):
    """Settings of quantize."""

    mode: Mode = Field(
        "int8_dynamic",
        description=(
            "int8_dynamic: int8 weights, activations quantized per batch at run time; no data "
            "needed. int8_static: int8 weights and activations in QDQ form (TensorRT and "
            "onnxruntime run it), activation ranges calibrated on calibration_dataset_id. "
            "fp16 / bf16: half-precision floats; about half the size."
        ),
    )
    per_channel: bool | None = Field(
        None,
        description=(
            "int8 modes: one weight scale per output channel instead of one per tensor (more "
            "accurate, slightly larger). Unset: per channel for int8_static, per tensor for "
            "int8_dynamic."
        ),
    )
    reduce_range: bool = Field(
        False,
        description=(
            "int8 modes: quantize weights to 7 bits. Avoids overflow in the int8 kernels of x86 "
            "CPUs without VNNI; costs some accuracy elsewhere."
        ),
    )
    op_types: list[OpType] | None = Field(
        None,
        min_length=1,
        description=(
            'int8 modes: op types to quantize, e.g. ["MatMul", "Gemm"]; unset: every op type '
            "the mode supports (MatMul, Gemm, Conv, Gather, Attention, ...)."
        ),
    )
    calibration_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "int8_static (required): the dataset whose train split calibrates the activation "
            "ranges; its rows must have the model's input shape. Also the evaluation dataset "
            "when eval_dataset_id is unset."
        ),
    )
    calibrate_method: CalibrateMethod = Field(
        "minmax",
        description=(
            "int8_static: how activation ranges are chosen from the calibration data. minmax: the "
            "observed min and max; entropy: the range that keeps the histogram's information "
            "(KL divergence); percentile: clips the extreme 0.001% of values."
        ),
    )
    calibration_samples: int = Field(
        256,
        ge=1,
        le=100_000,
        description="int8_static: how many rows of the calibration train split to run.",
    )
    keep_io_types: bool = Field(
        True,
        description=(
            "fp16 / bf16: keep float32 model inputs and outputs (casts at the edges), so callers "
            "keep sending and receiving float32. Off: inputs and outputs become fp16 / bf16."
        ),
    )
    eval_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "Dataset to measure the model's task metric on, before and after quantization; unset: "
            "calibration_dataset_id if set, else no accuracy check."
        ),
    )
    eval_split: Literal["validation", "test"] = Field(
        "validation", description="The split of the evaluation dataset to measure on."
    )
    min_retention: float = Field(
        0.99,
        ge=0.0,
        le=1.0,
        description=(
            "Least fraction of the parent's metric the quantized model must keep (0.99: at most "
            "1% worse) to be registered; below it, later stages run on the parent instead."
        ),
    )
    keep_below_threshold: bool = Field(
        False,
        description="Register the quantized model even when it keeps less than min_retention.",
    )

    @model_validator(mode="after")
    def _check_mode_settings(self) -> QuantizeSettings:
        # Only values that differ from the default count as "set": a validated pipeline is stored
        # with every field written out and must validate again as it is.
        problems: list[str] = []
        if self.mode == "int8_static" and self.calibration_dataset_id is None:
            problems.append(
                "int8_static needs calibration_dataset_id: the dataset whose train split "
                'calibrates the activation ranges (e.g. {"calibration_dataset_id": 3}); '
                "int8_dynamic needs none"
            )
        if self.mode != "int8_static":
            used = [
                name
                for name in ("calibration_dataset_id", "calibrate_method", "calibration_samples")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(f"{_listed(used, 'only apply')} to mode int8_static")
        if self.mode in _FLOAT_MODES:
            used = [
                name
                for name in ("per_channel", "reduce_range", "op_types")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(f"{_listed(used, 'only apply')} to the int8 modes")
        elif not self.keep_io_types:
            problems.append("keep_io_types only applies to modes fp16 and bf16")
        if self.effective_eval_dataset_id is None:
            used = [
                name
                for name in ("eval_split", "min_retention", "keep_below_threshold")
                if getattr(self, name) != type(self).model_fields[name].default
            ]
            if used:
                problems.append(
                    f"{_listed(used, 'need')} an evaluation dataset: set eval_dataset_id"
                )
        if problems:
            raise PydanticCustomError("quantize_settings", "; ".join(problems))
        return self

    @property
    def effective_eval_dataset_id(self) -> int | None:
        """The dataset retention is measured on: eval_dataset_id, else calibration_dataset_id."""
        if self.eval_dataset_id is not None:
            return self.eval_dataset_id
        return self.calibration_dataset_id

    @property
    def effective_per_channel(self) -> bool:
        if self.per_channel is not None:
            return self.per_channel
        return self.mode == "int8_static"


def precision_problem(mode: str, precision: str | None) -> str | None:
    """Why quantize in ``mode`` cannot take a model of ``precision``; None when it can.

    The phrase follows "the model ...": "is already int8". Every mode starts from fp32 (or from a
    model whose precision is unknown): quantizing a quantized model only adds error.
    """
    if precision is None or precision == Precision.FP32.value:
        return None
    if precision == MODE_PRECISION.get(mode, Precision.INT8.value):
        return f"is already {precision}"
    return f"is {precision}, and {mode} starts from the fp32 model"


def precision_rule(settings: StageSettings, precision: str | None) -> tuple[str, str | None]:
    """For validate_pipeline: the precision quantize leaves, and why it refuses the model (or None).

    The refusal follows "stage N (quantize): ".
    """
    mode = str(getattr(settings, "mode", "int8_dynamic"))
    target = MODE_PRECISION.get(mode, Precision.INT8.value)
    refusal = None
    if precision_problem(mode, precision) is None:
        pass
    elif precision == target:
        refusal = f"the model is already {precision} at that point; remove this stage"
    else:
        refusal = (
            f"the model is {precision} at that point, and {mode} starts from the fp32 model; "
            f"quantize once, from fp32: remove this stage or the one that made it {precision}"
        )
    return target, refusal


# -- onnx helpers ----------------------------------------------------------------------------------


def _np_dtype_of(ort_type: str) -> Any:
    """The numpy dtype of an onnxruntime input type such as "tensor(float16)"."""
    name = ort_type.removeprefix("tensor(").removesuffix(")")
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype({"float": "float32", "double": "float64"}.get(name, name))


def _run_session(
    session: onnxruntime.InferenceSession, arrays: Mapping[str, np.ndarray]
) -> list[np.ndarray]:
    """Run ``session`` on the arrays it takes, each cast to the type it declares."""
    feeds = {}
    for item in session.get_inputs():
        if item.name not in arrays:
            raise PipelineError(
                f"the ONNX model needs input {item.name!r} that the artifact does not declare "
                f"(declared: {sorted(arrays)})"
            )
        feeds[item.name] = np.asarray(arrays[item.name]).astype(_np_dtype_of(item.type))
    return list(session.run(None, feeds))


def _max_abs_diff(reference: Sequence[Any], other: Sequence[Any]) -> float:
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(reference, other, strict=False)
        if np.asarray(a).size
    ]
    return max(diffs, default=0.0)


def _session(path: str | Path, providers: Sequence[str]) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=list(providers))


class _RunFailed(PipelineError):
    """onnxruntime cannot load or run the model a mode made; ``cause`` is its error line."""

    def __init__(self, mode: str, cause: str) -> None:
        hint = (
            '; limit op_types (e.g. ["MatMul"]) to leave the failing op type in float'
            if mode in _INT8_MODES
            else ""
        )
        super().__init__(f"onnxruntime cannot run the {mode} model: {cause}{hint}")
        self.cause = cause


def _check_runs(
    source_path: str,
    new_path: Path,
    mode: str,
    providers: Sequence[str],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> float | None:
    """Load and run the new model once; its max abs difference to the source on the same input.

    ``feeds`` default to random normal data; static int8 passes real rows instead, since its
    activation ranges only cover data like the calibration set. None when the source model itself
    cannot run the input (a named dim whose size the model constrains): then there is nothing to
    compare with, and no reason to fail the stage as long as the new model loads.
    """
    if feeds is None:
        specs, _ = read_tensor_specs(source_path)
        feeds = random_inputs(specs, batch_size=1, default_dim=8)
    try:
        reference = _run_session(_session(source_path, CPU_PROVIDERS), feeds)
    except Exception as exc:
        logger.info("quantize: not comparing outputs, the source model cannot run (%s)", exc)
        reference = None
    try:
        session = _session(new_path, providers)
    except Exception as exc:
        raise _RunFailed(mode, first_error_line(exc)) from exc
    try:
        produced = _run_session(session, feeds)
    except Exception as exc:
        if reference is None:
            return None
        raise _RunFailed(mode, first_error_line(exc)) from exc
    if reference is None:
        return None
    return _max_abs_diff(reference, produced)


def _save(model: onnx.ModelProto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
        )
    else:
        onnx.save_model(model, str(path))


def _toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph``'s nodes so each comes after the nodes it reads from (TensorRT needs it).

    The float16 converter appends its input/output casts at the end; onnxruntime sorts for itself,
    TensorRT's parser does not. Nodes in a cycle or reading unknown names keep their order, last.
    """
    producers: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producers[out] = i
    deps = [
        {producers[name] for name in node.input if name in producers and producers[name] != i}
        for i, node in enumerate(graph.node)
    ]
    users: dict[int, list[int]] = {i: [] for i in range(len(graph.node))}
    for i, wanted in enumerate(deps):
        for j in wanted:
            users[j].append(i)
    remaining = [len(d) for d in deps]
    ready = deque(i for i, n in enumerate(remaining) if n == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in users[i]:
            remaining[j] -= 1
            if remaining[j] == 0:
                ready.append(j)
    placed = set(order)
    order += [i for i in range(len(graph.node)) if i not in placed]
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)


# -- op counts -------------------------------------------------------------------------------------


def _dynamic_counts(path: Path) -> Counter[str]:
    return Counter(op for op in op_types(path) if _QUANTIZED_OP.search(op))


def _qdq_counts(path: Path) -> Counter[str]:
    """Op types of the nodes that read a DequantizeLinear output: the ones running on int8 data."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for n in graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    return Counter(
        node.op_type
        for node in graph.node
        if node.op_type not in _QDQ_OPS and any(i in dequantized for i in node.input)
    )


def _float_counts(model: onnx.ModelProto, elem_type: int) -> Counter[str]:
    """Op types of the nodes (casts aside) that write a tensor of ``elem_type``."""
    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    return Counter(
        node.op_type
        for node in graph.node
        if node.op_type != "Cast" and any(types.get(o) == elem_type for o in node.output)
    )


def _describe_counts(counts: Counter[str]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in counts.most_common()) or "none"


def _zero_points_all_zero(path: Path) -> bool:
    """Whether every zero point of the QDQ graph is 0 (symmetric, as TensorRT requires)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        zero_point = node.input[2] if node.op_type in _QDQ_OPS and len(node.input) > 2 else ""
        if zero_point in inits and np.any(numpy_helper.to_array(inits[zero_point]) != 0):
            return False
    return True


# -- float conversion ------------------------------------------------------------------------------


def to_bfloat16(fp32: onnx.ModelProto, fp16: onnx.ModelProto) -> onnx.ModelProto:
    """``fp16`` (``fp32`` run through convert_float_to_float16) with bfloat16 in place of float16.

    The converter decides which tensors and ops change type and where the casts go; this swaps
    the type and takes the weights from the fp32 originals (bf16 has fp32's range, so nothing is
    clipped to fp16's 65504 or flushed below its 6e-8).
    """
    import ml_dtypes
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(fp16)
    originals: dict[str, onnx.TensorProto] = {t.name: t for t in fp32.graph.initializer}
    for node in fp32.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and node.output:
                originals.setdefault(node.output[0], attr.t)

    def bf16_tensor(tensor: onnx.TensorProto, key: str) -> onnx.TensorProto:
        source = originals.get(key)
        if source is None or source.data_type != TensorProto.FLOAT:
            source = tensor
        values = numpy_helper.to_array(source).astype(np.float32).astype(ml_dtypes.bfloat16)
        converted = numpy_helper.from_array(values, tensor.name)
        return converted

    def fix_graph(graph: onnx.GraphProto) -> None:
        for i, tensor in enumerate(graph.initializer):
            if tensor.data_type == TensorProto.FLOAT16:
                graph.initializer[i].CopyFrom(bf16_tensor(tensor, tensor.name))
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
                value.type.tensor_type.elem_type = TensorProto.BFLOAT16
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == (
                    TensorProto.FLOAT16
                ):
                    key = node.output[0] if node.output else attr.t.name
                    attr.t.CopyFrom(bf16_tensor(attr.t, key))
                elif attr.type == onnx.AttributeProto.INT and attr.name in ("to", "dtype"):
                    if attr.i == TensorProto.FLOAT16:
                        attr.i = TensorProto.BFLOAT16
                elif attr.type == onnx.AttributeProto.GRAPH:
                    fix_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        fix_graph(sub)

    fix_graph(model.graph)
    return model


def convert_float(
    fp32: onnx.ModelProto,
    mode: str,
    keep_io_types: bool = True,
    op_block_list: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """``fp32`` converted to fp16 or bf16 (``mode``), nodes in topological order; ``fp32`` is kept.

    ``op_block_list`` (default: the converter's own list of ops with no float16 form) stay fp32
    behind casts. ``fp32`` should carry inferred shapes (value_info): they tell the converter
    which tensors are float.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    work = onnx.ModelProto()
    work.CopyFrom(fp32)  # the converter rewrites the model it is given, in place
    converted = convert_float_to_float16(
        work,
        keep_io_types=keep_io_types,
        op_block_list=list(DEFAULT_OP_BLOCK_LIST if op_block_list is None else op_block_list),
        disable_shape_infer=True,
    )
    if mode == "bf16":
        converted = to_bfloat16(fp32, converted)
    _toposort(converted.graph)
    return converted


@dataclass
class _Made:
    """What a mode's conversion produced, besides the file."""

    counts: Counter[str]
    providers: list[str] = field(default_factory=lambda: list(CPU_PROVIDERS))
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The session check already ran (float modes check as part of choosing what stays fp32).
    max_abs_diff: float | None = None
    checked: bool = False
    # Rows to compare the new model with its parent on (None: random data).
    check_feeds: dict[str, np.ndarray] | None = None


def _bf16_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in _BF16_PROVIDERS if p in available] + list(CPU_PROVIDERS)


def _convert_float(
    source: Artifact, out: Path, scratch: Path, s: QuantizeSettings, external: bool
) -> _Made:
    """fp16 / bf16 conversion; op types the provider has no kernel for stay fp32 (fp16 only)."""
    import onnx
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    # Types of intermediate tensors tell the converter where casts go. The path form works for
    # models over 2 GB; their external data stays next to the source, so it is loaded from there.
    inferred = scratch / "inferred.onnx"
    try:
        onnx.shape_inference.infer_shapes_path(source.path, str(inferred))
        fp32 = onnx.load(str(inferred), load_external_data=False)
        load_external_data_for_model(fp32, str(Path(source.path).parent))
    except Exception as exc:  # a custom op shape inference does not know: convert without it
        logger.warning("quantize: shape inference failed (%s)", first_error_line(exc))
        fp32 = onnx.load(source.path)
    present = set(op_types(source.path))
    blocked = list(DEFAULT_OP_BLOCK_LIST)
    kept_fp32: list[str] = sorted(present & set(blocked))
    elem = TensorProto.FLOAT16 if s.mode == "fp16" else TensorProto.BFLOAT16
    providers = list(CPU_PROVIDERS) if s.mode == "fp16" else _bf16_providers()
    cpu_only = providers == list(CPU_PROVIDERS)
    # Each pass that fails for a missing kernel leaves that op type in fp32; a model has few. Not
    # for bf16 on the CPU provider: it has (almost) no bf16 kernels, so nothing would be left.
    for _ in range(8):
        try:
            converted = convert_float(fp32, s.mode, s.keep_io_types, blocked)
        except Exception as exc:
            raise PipelineError(f"{s.mode} conversion failed: {first_error_line(exc)}") from exc
        _save(converted, out, external)
        try:
            max_abs_diff = _check_runs(source.path, out, s.mode, providers)
            break
        except _RunFailed as exc:
            missing = _NO_KERNEL.search(exc.cause)
            op = missing.group(1) if missing else None
            if (s.mode == "fp16" or not cpu_only) and op in present and op not in blocked:
                logger.info("quantize: no %s kernel for %s; keeping it in fp32", s.mode, op)
                blocked.append(op)
                kept_fp32.append(op)
                continue
            if s.mode == "bf16":
                if cpu_only:
                    raise PipelineError(
                        "bf16 needs a backend that runs it, e.g. TensorRT or ORT's CUDA "
                        "provider; this worker has CPU only (onnxruntime's CPU provider has no "
                        f"bf16 kernels for this model: {exc.cause}). Use mode fp16 on a CPU "
                        "worker"
                    ) from exc
                raise PipelineError(
                    f"onnxruntime ({', '.join(providers)}) cannot run the bf16 model: {exc.cause}"
                ) from exc
            raise
    else:
        raise PipelineError(f"{s.mode}: too many op types without a kernel ({kept_fp32})")
    counts = _float_counts(converted, elem)
    if not counts:
        raise PipelineError(f"nothing was converted to {s.mode}: the model has no float ops")
    notes = [f"kept in fp32: {', '.join(sorted(set(kept_fp32)))}"] if kept_fp32 else []
    return _Made(
        counts=counts,
        providers=list(providers),
        notes=notes,
        meta={"keep_io_types": s.keep_io_types, "fp32_op_types": sorted(set(kept_fp32))},
        max_abs_diff=max_abs_diff,
        checked=True,
    )


# -- int8 ------------------------------------------------------------------------------------------


def _preprocess(source: Artifact, scratch: Path, external: bool) -> str | None:
    """quant_pre_process into ``scratch``; None (and a warning) when the model defeats it.

    Pre-processing (symbolic shape inference + graph cleanup) lets the quantizer see shapes and
    fused patterns it otherwise misses; an improvement, not a need.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        pre = scratch / "preprocessed.onnx"
        quant_pre_process(source.path, str(pre), save_as_external_data=external)
        return str(pre)
    except Exception as exc:
        logger.warning(
            "quantize %s: pre-processing failed (%s); quantizing the model as it is",
            source.key,
            first_error_line(exc),
        )
        return None


def _nothing_quantized(source: Artifact, s: QuantizeSettings) -> PipelineError:
    present = ", ".join(sorted(Counter(op_types(source.path)))) or "none"
    wanted = f"the op types {s.op_types}" if s.op_types else "any op type it supports"
    return PipelineError(
        f"nothing was quantized: the model has none of {wanted} (its op types: {present})"
    )


def _int8_dynamic(
    source: Artifact, to_quantize: str, out: Path, s: QuantizeSettings, external: bool
) -> _Made:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            to_quantize,
            str(out),
            op_types_to_quantize=s.op_types,
            per_channel=s.effective_per_channel,
            reduce_range=s.reduce_range,
            weight_type=QuantType.QInt8,
            use_external_data_format=external,
        )
    except Exception as exc:
        raise PipelineError(f"int8 quantization failed: {first_error_line(exc)}") from exc
    counts = _dynamic_counts(out)
    if not counts:
        raise _nothing_quantized(source, s)
    return _Made(counts=counts)


def _calibration_reader(
    ref: DatasetRef, to_quantize: str, s: QuantizeSettings
) -> tuple[SplitCalibrationReader, SplitData]:
    """A reader over the calibration train split, and the split; a PipelineError if it misfits."""
    from pipelines.calibration import SplitCalibrationReader, check_fits
    from pipelines.datasets import load_split

    specs, _ = read_tensor_specs(to_quantize)
    what = f"calibration dataset {ref.id} (calibration_dataset_id, train split)"
    try:
        data = load_split(ref, "train", specs)
    except PipelineError as exc:  # rows that do not map onto the inputs: it names both shapes
        raise PipelineError(
            f"calibration_dataset_id {ref.id} cannot calibrate this model: {exc}; pick a "
            "dataset whose rows have the model's input shape"
        ) from exc
    check_fits(data, specs, what)
    if data.rows == 0:
        raise PipelineError(f"{what} has no rows")
    fixed = fixed_batch(specs)
    batch = fixed or min(32, s.calibration_samples)
    reader = SplitCalibrationReader(
        data,
        [t.name for t in specs],
        s.calibration_samples,
        batch,
        full_batches=fixed is not None,
    )
    if reader.samples == 0:
        raise PipelineError(
            f"{what} has {data.rows} rows, fewer than the model's fixed batch of {fixed}"
        )
    return reader, data


def _int8_static(
    ctx: PipelineContext,
    source: Artifact,
    to_quantize: str,
    out: Path,
    s: QuantizeSettings,
    external: bool,
    progress: ProgressFn,
) -> _Made:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    assert s.calibration_dataset_id is not None  # the settings validator makes sure
    ref = ctx.dataset(s.calibration_dataset_id, "calibration_dataset_id")
    reader, data = _calibration_reader(ref, to_quantize, s)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[s.calibrate_method]
    progress(0.3, f"calibrating ({s.calibrate_method}) on {reader.samples} rows")
    chatter = io.StringIO()  # the histogram calibrators print their progress
    try:
        with contextlib.redirect_stdout(chatter):
            quantize_static(
                to_quantize,
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=s.op_types,
                per_channel=s.effective_per_channel,
                reduce_range=s.reduce_range,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                use_external_data_format=external,
                # Biases stay float: TensorRT's ONNX parser refuses the int32 DequantizeLinear
                # nodes ORT writes for quantized biases, and it fuses a float bias itself.
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": True,
                    "QuantizeBias": False,
                },
            )
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"int8 static quantization failed: {first_error_line(exc)}") from exc
    finally:
        if chatter.getvalue().strip():
            logger.debug("quantize_static: %s", chatter.getvalue().strip())
    counts = _qdq_counts(out)
    if not counts:
        raise _nothing_quantized(source, s)
    symmetric = _zero_points_all_zero(out)
    notes = [] if symmetric else ["some zero points are not 0: TensorRT will refuse this model"]
    reader.rewind()
    return _Made(
        counts=counts,
        notes=notes,
        check_feeds=reader.get_next(),  # the first calibration batch
        meta={
            "quant_format": "QDQ",
            "calibrate_method": s.calibrate_method,
            "calibration_dataset_id": s.calibration_dataset_id,
            "calibration_rows": reader.samples,
            "symmetric": symmetric,
        },
    )


# -- retention -------------------------------------------------------------------------------------


@dataclass
class _Evaluation:
    metric: str
    higher_is_better: bool
    value: float
    parent: float
    retention: float
    rows: int
    dataset_id: int
    split: str

    def describe(self) -> str:
        kept = f"{_pct(self.retention)} kept" if math.isfinite(self.retention) else "parent at 0"
        return (
            f"{self.metric} {self.parent:.4f} -> {self.value:.4f} ({kept}) "
            f"on {self.rows} {self.split} rows of dataset {self.dataset_id}"
        )


def _pct(fraction: float, other: float | None = None) -> str:
    """``97.4%``; more digits when one digit would show it equal to ``other``."""
    for digits in (1, 2, 3, 4):
        text = f"{fraction * 100:.{digits}f}"
        if other is None or text != f"{other * 100:.{digits}f}":
            return text + "%"
    return f"{fraction * 100:.4f}%"


def _predict_on(
    session: onnxruntime.InferenceSession, inputs: Mapping[str, np.ndarray], rows: int
) -> np.ndarray:
    chunks = []
    for start in range(0, rows, _EVAL_BATCH):
        batch = {name: a[start : start + _EVAL_BATCH] for name, a in inputs.items()}
        chunks.append(np.asarray(_run_session(session, batch)[0], np.float32))
    return np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)


class _Unmeasurable(PipelineError):
    """The eval split has no targets and the task's metric has no form against the parent."""


def _evaluate(
    ctx: PipelineContext,
    source: Artifact,
    candidate: Artifact,
    dataset_id: int,
    s: QuantizeSettings,
    providers: Sequence[str],
    progress: ProgressFn,
) -> _Evaluation:
    """The primary metric of ``ctx.task`` for the parent and the new model on the eval split.

    Without targets in the dataset, classification is judged on ``agreement`` with the parent's
    top-1 class and embedding on ``cosine`` to the parent's outputs (the parent scores 1.0 on
    both); regression and other tasks have nothing to compare with (_Unmeasurable).
    """
    from pipelines.datasets import load_split
    from pipelines.metrics import predict, primary_metric, retention, task_metrics

    ref = ctx.dataset(dataset_id, "eval_dataset_id")
    name, higher_is_better = primary_metric(ctx.task)
    data = load_split(ref, s.eval_split, source.inputs)
    if data.rows == 0:
        raise PipelineError(
            f"evaluation dataset {dataset_id} has no {s.eval_split} rows; pick another "
            "eval_split or dataset"
        )
    if data.targets is None:
        if ctx.task == "classification":
            name, higher_is_better = "agreement", True
        elif ctx.task != "embedding":
            raise _Unmeasurable(
                f"evaluation dataset {dataset_id} has no target column, and {name} "
                f"({ctx.task}) needs one"
            )
    progress(0.8, f"measuring {name} of the parent on {data.rows} {s.eval_split} rows")
    parent_out = predict(source, data.inputs)
    progress(0.9, f"measuring {name} of the {s.mode} model")
    if any(t.dtype == "bfloat16" for t in candidate.inputs):  # predict feeds no bfloat16
        child_out = _predict_on(_session(candidate.path, providers), data.inputs, data.rows)
    else:
        child_out = predict(candidate, data.inputs)
    parent_value = task_metrics(ctx.task, parent_out, data.targets, reference=parent_out)[name]
    child_value = task_metrics(ctx.task, child_out, data.targets, reference=parent_out)[name]
    return _Evaluation(
        metric=name,
        higher_is_better=higher_is_better,
        value=float(child_value),
        parent=float(parent_value),
        retention=float(retention(float(child_value), float(parent_value), higher_is_better)),
        rows=data.rows,
        dataset_id=dataset_id,
        split=s.eval_split,
    )


class _NotRegistered(Exception):
    """Raised inside the staging block so that a refused model is never published."""

    def __init__(self, evaluation: _Evaluation, made: _Made, out_bytes: int) -> None:
        super().__init__("below the retention threshold")
        self.evaluation = evaluation
        self.made = made
        self.out_bytes = out_bytes


def _remove_stale_output(stage_dir: Path) -> None:
    """A model an earlier, killed run of this stage published is not an output of this one."""
    final = stage_dir / ONNX_FILENAME
    if final.is_file():
        for extra in external_data_files(final):
            extra.unlink(missing_ok=True)
        final.unlink()


class Quantize:
    """int8 (dynamic or static QDQ), fp16 or bf16, checked against the parent's task metric."""

    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "Quantize an fp32 ONNX model: int8_dynamic (no data needed), int8_static (QDQ, calibrated "
        "on a dataset; runs on TensorRT and onnxruntime), fp16 or bf16. With an evaluation "
        "dataset, a model that keeps less than min_retention of the parent's metric is not "
        "registered."
    )
    Settings: ClassVar[type[StageSettings]] = QuantizeSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Quantize the current ONNX artifact; the new model becomes current if it is kept."""
        started = time.perf_counter()
        s = coerce_settings(QuantizeSettings, settings)
        source = ctx.current_artifact
        require_format(source, self.name, self.accepts)
        problem = precision_problem(s.mode, source.precision)
        if problem is not None:
            raise PipelineError(
                f"the model {source.key!r} {problem}: quantizing a quantized model only adds "
                "error; remove this quantize stage or quantize its fp32 parent"
            )
        eval_id = s.effective_eval_dataset_id
        if eval_id is not None:  # a missing dataset fails now, not after the quantization
            ctx.dataset(eval_id, "eval_dataset_id")
        if s.calibration_dataset_id is not None:
            ctx.dataset(s.calibration_dataset_id, "calibration_dataset_id")

        import onnxruntime

        source_bytes = model_size_bytes(source.path)
        external = uses_external_data(source.path) or source_bytes > EXTERNAL_DATA_THRESHOLD
        stage_dir = ctx.stage_dir(stage_id)
        preprocessed: bool | None = None
        evaluation: _Evaluation | None = None
        unchecked = ""
        try:
            with scratch_dir(stage_dir) as scratch, staged_output(stage_dir, ONNX_FILENAME) as out:
                if s.mode in _INT8_MODES:
                    progress(0.0, "pre-processing the model for quantization")
                    pre = _preprocess(source, scratch, external)
                    preprocessed = pre is not None
                    to_quantize = pre or source.path
                    if s.mode == "int8_dynamic":
                        progress(0.3, "quantizing weights to int8")
                        made = _int8_dynamic(source, to_quantize, out, s, external)
                    else:
                        made = _int8_static(ctx, source, to_quantize, out, s, external, progress)
                else:
                    progress(0.0, f"converting the model to {s.mode}")
                    made = _convert_float(source, out, scratch, s, external)
                if not made.checked:
                    progress(0.7, f"checking that onnxruntime runs the {s.mode} model")
                    made.max_abs_diff = _check_runs(
                        source.path, out, s.mode, made.providers, made.check_feeds
                    )
                inputs, outputs = read_tensor_specs(out)
                out_bytes = model_size_bytes(out)
                artifact = Artifact(
                    key=stage_id,
                    path=str(out),
                    format=ModelFormat.ONNX.value,
                    precision=MODE_PRECISION[s.mode],
                    inputs=inputs,
                    outputs=outputs,
                    parent=source.key,
                    produced_by=self.name,
                )
                if eval_id is not None:
                    try:
                        evaluation = _evaluate(
                            ctx, source, artifact, eval_id, s, made.providers, progress
                        )
                    except _Unmeasurable as exc:
                        if s.eval_dataset_id is not None:  # asked for by name: say why not
                            raise
                        unchecked = f"no retention check: {exc}"
                    if (
                        evaluation is not None
                        and evaluation.retention < s.min_retention
                        and not s.keep_below_threshold
                    ):
                        raise _NotRegistered(evaluation, made, out_bytes)
        except _NotRegistered as refused:
            _remove_stale_output(stage_dir)
            return self._refused(stage_id, started, s, source_bytes, refused)

        final = stage_dir / ONNX_FILENAME
        size_ratio = out_bytes / source_bytes if source_bytes else 1.0
        metrics = self._metrics(size_ratio, made, evaluation)
        artifact.path = str(final)
        artifact.metrics = {"size_bytes": float(out_bytes), **metrics}
        artifact.meta = {
            "mode": s.mode,
            "onnxruntime_version": onnxruntime.__version__,
            "quantized_ops": dict(made.counts),
            "settings": settings_meta(s),
            **({} if preprocessed is None else {"preprocessed": preprocessed}),
            **made.meta,
        }
        if evaluation is not None:
            artifact.meta["evaluation"] = {
                "metric": evaluation.metric,
                "dataset_id": evaluation.dataset_id,
                "split": evaluation.split,
                "rows": evaluation.rows,
            }
        ctx.add_artifact(artifact)
        progress(1.0, "quantized")

        notes = list(made.notes)
        if unchecked:
            notes.append(unchecked)
        if preprocessed is False:
            notes.append("pre-processing failed; quantized the model as it is")
        if evaluation is not None and evaluation.retention < s.min_retention:
            notes.append(
                f"under the {_pct(s.min_retention, evaluation.retention)} threshold, kept "
                "because keep_below_threshold is set"
            )
        message = (
            f"{self._headline(s, made)}, {human_bytes(source_bytes)} -> {human_bytes(out_bytes)} "
            f"(x{size_ratio:.2f})"
        )
        if evaluation is not None:
            message += f"; {evaluation.describe()}"
        if notes:
            message += f" ({'; '.join(notes)})"
        return timed_result(
            stage_id, self.name, started, outputs=[artifact.key], metrics=metrics, message=message
        )

    @staticmethod
    def _headline(s: QuantizeSettings, made: _Made) -> str:
        total = sum(made.counts.values())
        if s.mode == "int8_dynamic":
            what = "int8 dynamic quantization"
        elif s.mode == "int8_static":
            what = (
                f"int8 static quantization (QDQ, symmetric, "
                f"{'per-channel' if s.effective_per_channel else 'per-tensor'} weights, "
                f"{s.calibrate_method} calibration on {made.meta.get('calibration_rows')} rows)"
            )
        else:
            counts = _describe_counts(made.counts)
            return f"{s.mode} conversion: {total} nodes in {s.mode} ({counts})"
        return f"{what}: {total} quantized nodes ({_describe_counts(made.counts)})"

    @staticmethod
    def _metrics(
        size_ratio: float, made: _Made, evaluation: _Evaluation | None
    ) -> dict[str, float]:
        metrics: dict[str, float] = {
            "size_ratio": size_ratio,
            "quantized_nodes": float(sum(made.counts.values())),
            **{f"quantized_ops.{op}": float(n) for op, n in sorted(made.counts.items())},
        }
        if made.max_abs_diff is not None:
            metrics["max_abs_diff"] = made.max_abs_diff
        if evaluation is not None:
            if math.isfinite(evaluation.retention):  # inf: the parent scored 0 (JSON has no inf)
                metrics["retention"] = evaluation.retention
            metrics[evaluation.metric] = evaluation.value
            metrics[f"parent_{evaluation.metric}"] = evaluation.parent
        return metrics

    def _refused(
        self,
        stage_id: str,
        started: float,
        s: QuantizeSettings,
        source_bytes: int,
        refused: _NotRegistered,
    ) -> StageResult:
        e = refused.evaluation
        size_ratio = refused.out_bytes / source_bytes if source_bytes else 1.0
        message = (
            f"{s.mode} kept {_pct(e.retention, s.min_retention)} of {e.metric} "
            f"({e.value:.4f} vs {e.parent:.4f} on {e.rows} {e.split} rows of dataset "
            f"{e.dataset_id}), under the {_pct(s.min_retention, e.retention)} threshold: not "
            "registered (set keep_below_threshold to keep it); later stages use the parent"
        )
        return timed_result(
            stage_id,
            self.name,
            started,
            outputs=[],
            metrics=self._metrics(size_ratio, refused.made, e),
            message=message,
        )
