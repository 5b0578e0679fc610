"""What TensorRT can take of an ONNX graph: its quantization, and the optimisation profile.

TensorRT's int8 is explicit quantization only (symmetric int8 QuantizeLinear/DequantizeLinear
pairs); dynamically or operator-quantized graphs are refused before a build is started, with the
remedy. The optimisation profile gives every dynamic dim its [min, opt, max].

Pure functions: no tensorrt, no GPU (onnx is imported when a graph is read).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.core import PipelineError, TensorSpec

# Ops that only appear in dynamically or operator-quantized graphs; TensorRT runs none of them.
_NON_QDQ_QUANT_OPS = re.compile(r"Integer$|^DynamicQuantize|^QLinear|^Q(Gemm|Attention|Ordered)")


@dataclass
class QuantInfo:
    """How an ONNX graph is quantized, as TensorRT sees it."""

    quantize_linear: int = 0
    dequantize_linear: int = 0
    other_quantized_ops: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def has_qdq(self) -> bool:
        return self.quantize_linear > 0 and self.dequantize_linear > 0


def onnx_quantization(path: str | Path) -> QuantInfo:
    """Count the Q/DQ nodes of an ONNX file and list what TensorRT's explicit INT8 cannot take.

    TensorRT wants int8 (or fp8) Q/DQ with zero points of 0: a uint8 or non-zero zero point
    (onnxruntime's default asymmetric activations) is listed in ``problems``, and so are biases
    quantized to int32 (onnxruntime's default, ``QuantizeBias``), which its parser rejects.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    constants = {
        node.output[0]: attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value"
    }
    info = QuantInfo()
    other: set[str] = set()
    bad_zero_points: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            info.quantize_linear += 1
        elif node.op_type == "DequantizeLinear":
            info.dequantize_linear += 1
        elif _NON_QDQ_QUANT_OPS.search(node.op_type):
            other.add(node.op_type)
            continue
        else:
            continue
        if node.op_type == "DequantizeLinear":
            source = initializers.get(node.input[0]) or constants.get(node.input[0])
            if source is not None and source.data_type == onnx.TensorProto.INT32:
                # onnxruntime's quantize_static quantizes biases to int32 unless told not to;
                # TensorRT's parser refuses a DequantizeLinear of anything but activations.
                bad_zero_points.add("int32-quantized biases (QuantizeBias must be off)")
        if len(node.input) < 3 or not node.input[2]:
            continue
        zero_point = initializers.get(node.input[2]) or constants.get(node.input[2])
        if zero_point is None:
            continue
        values = numpy_helper.to_array(zero_point)
        if values.dtype == np.uint8:
            bad_zero_points.add("uint8 zero points (asymmetric activations)")
        elif np.issubdtype(values.dtype, np.integer) and np.any(values != 0):
            bad_zero_points.add("non-zero zero points")
    info.other_quantized_ops = sorted(other)
    info.problems = sorted(bad_zero_points)
    return info


def check_int8(info: QuantInfo, int8: bool) -> None:
    """A PipelineError when the int8 setting and the graph's quantization do not fit TensorRT."""
    remedy = (
        "quantize with mode int8_static (symmetric int8 QuantizeLinear/DequantizeLinear pairs) "
        "before compiling for TensorRT"
    )
    if info.other_quantized_ops:
        raise PipelineError(
            f"the model is quantized with {', '.join(info.other_quantized_ops)}, which TensorRT "
            f"does not run: compile the fp32 model, or {remedy}"
        )
    if int8 and not info.has_qdq:
        raise PipelineError(
            "int8 needs an explicitly quantized model (QuantizeLinear/DequantizeLinear nodes) and "
            f"this one has none: {remedy}, or leave int8 off (fp16 needs no calibration)"
        )
    if info.has_qdq and not int8:
        raise PipelineError(
            "the model has QuantizeLinear/DequantizeLinear nodes: set int8 true to build it "
            "(TensorRT runs them as int8)"
        )
    if info.has_qdq and info.problems:
        raise PipelineError(
            "TensorRT needs symmetric int8 Q/DQ of weights and activations only, but the model "
            f"has {' and '.join(info.problems)}: {remedy}"
        )


def profile_shapes(
    specs: Sequence[TensorSpec],
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    dim_ranges: Mapping[str, Sequence[int]],
) -> dict[str, list[list[int]]]:
    """The optimisation profile: input name -> [min shape, opt shape, max shape].

    A named first dim (and that name anywhere) is the batch; other named dims take
    ``dim_ranges[name]`` = [min, opt, max], and a PipelineError lists any without one.
    """
    batch = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    missing = sorted(
        {
            d
            for s in specs
            for i, d in enumerate(s.shape)
            if isinstance(d, str) and i > 0 and d not in batch and d not in dim_ranges
        }
    )
    if missing:
        example = ", ".join(f'"{name}": [1, 128, 512]' for name in missing)
        raise PipelineError(
            f"TensorRT needs a range for every dynamic dim: set dim_ranges for "
            f"{', '.join(missing)}, e.g. {{{example}}} (min, opt, max)"
        )
    profiles: dict[str, list[list[int]]] = {}
    for spec in specs:
        rows: list[list[int]] = [[], [], []]
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                sizes = [dim, dim, dim]
            elif i == 0 or dim in batch:
                sizes = [min_batch, opt_batch, max_batch]
            else:
                sizes = [int(v) for v in dim_ranges[dim]]
            for row, size in zip(rows, sizes, strict=True):
                row.append(int(size))
        profiles[spec.name] = rows
    return profiles
