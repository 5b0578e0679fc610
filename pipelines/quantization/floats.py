"""fp16 and bf16: an fp32 ONNX model with its float tensors converted to half precision.

onnxruntime's ``convert_float_to_float16`` decides which tensors and ops change and where the
casts go; bf16 swaps the type afterwards (:func:`to_bfloat16`). An op type the provider has no
half-precision kernel for is found by running the result (``Could not find an implementation``)
and left in fp32 behind casts, pass by pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipelines.core import Artifact, PipelineError
from pipelines.onnx_io import CPU_PROVIDERS, first_error_line, op_types
from pipelines.quantization.checks import Made, RunFailed, check_runs
from pipelines.quantization.graph import float_counts, save_model, toposort
from pipelines.quantization.settings import QuantizeSettings

if TYPE_CHECKING:
    import onnx

__all__ = ["bf16_providers", "convert_float", "convert_to_float", "to_bfloat16"]

logger = logging.getLogger(__name__)

# "Could not find an implementation for Gemm(13) node with name '/0/Gemm'"
NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(\d+\)")
# Providers that run bf16 models; the CPU provider has almost no bf16 kernels.
BF16_PROVIDERS = ("CUDAExecutionProvider",)


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
    toposort(converted.graph)
    return converted


def bf16_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in BF16_PROVIDERS if p in available] + list(CPU_PROVIDERS)


def convert_to_float(
    source: Artifact, out: Path, scratch: Path, s: QuantizeSettings, external: bool
) -> Made:
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
    providers = list(CPU_PROVIDERS) if s.mode == "fp16" else bf16_providers()
    cpu_only = providers == list(CPU_PROVIDERS)
    # Each pass that fails for a missing kernel leaves that op type in fp32; a model has few. Not
    # for bf16 on the CPU provider: it has (almost) no bf16 kernels, so nothing would be left.
    for _ in range(8):
        try:
            converted = convert_float(fp32, s.mode, s.keep_io_types, blocked)
        except Exception as exc:
            raise PipelineError(f"{s.mode} conversion failed: {first_error_line(exc)}") from exc
        save_model(converted, out, external)
        try:
            max_abs_diff = check_runs(source, out, s.mode, providers)
            break
        except RunFailed as exc:
            missing = NO_KERNEL.search(exc.cause)
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
    counts = float_counts(converted, elem)
    if not counts:
        raise PipelineError(f"nothing was converted to {s.mode}: the model has no float ops")
    notes = [f"kept in fp32: {', '.join(sorted(set(kept_fp32)))}"] if kept_fp32 else []
    return Made(
        counts=counts,
        providers=list(providers),
        notes=notes,
        meta={"keep_io_types": s.keep_io_types, "fp32_op_types": sorted(set(kept_fp32))},
        max_abs_diff=max_abs_diff,
        checked=True,
    )
