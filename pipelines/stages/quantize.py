"""quantize: ONNX fp32/fp16 -> ONNX int8 with onnxruntime's quantization tools."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    Precision,
    ProgressFn,
    StageResult,
    StageSettings,
    TensorSpec,
    timed_result,
)
from pipelines.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    cpu_session,
    first_error_line,
    human_bytes,
    model_size_bytes,
    op_types,
    random_inputs,
    read_tensor_specs,
    session_feeds,
    uses_external_data,
)
from pipelines.stages._common import ONNX_FILENAME, coerce_settings, require_format, settings_meta
from pipelines.staging import scratch_dir, staged_output

logger = logging.getLogger(__name__)

OpType = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64)]

# Ops that only appear in a graph once something was quantized: MatMulInteger, ConvInteger,
# DynamicQuantizeLinear, DequantizeLinear (quantized Gather), QAttention, QGemm, ...
_QUANTIZED_OP = re.compile(r"(?i:integer|quantize)|^Q[A-Z]")


class QuantizeSettings(StageSettings):
    """Settings of quantize."""

    mode: Literal["int8_dynamic"] = Field(
        "int8_dynamic",
        description=(
            "int8_dynamic: weights are stored as int8 and activations are quantized on the fly, "
            "per batch, so no calibration data is needed."
        ),
    )
    per_channel: bool = Field(
        False,
        description=(
            "One scale per output channel instead of one per tensor: more accurate, mostly for "
            "convolutions, at a slightly larger file."
        ),
    )
    reduce_range: bool = Field(
        False,
        description=(
            "Quantize weights to 7 bits. Avoids overflow in the int8 kernels of x86 CPUs without "
            "VNNI; costs some accuracy elsewhere."
        ),
    )
    op_types: list[OpType] | None = Field(
        None,
        min_length=1,
        description=(
            'Op types to quantize, e.g. ["MatMul", "Gemm"]; unset: every op type dynamic '
            "quantization supports (MatMul, Gemm, Conv, Gather, Attention, LSTM, ...)."
        ),
    )


def _quantized_node_count(ops: list[str]) -> int:
    return sum(1 for op in ops if _QUANTIZED_OP.search(op))


def _check_runs(source_path: str, quantized_path: Path, inputs: list[TensorSpec]) -> float | None:
    """Run the int8 model once; its max abs difference to the source model on that input.

    None when the source model itself cannot run the generated input (a named dim whose size the
    model constrains): then there is nothing to compare with, and no reason to fail the stage.
    """
    feeds = random_inputs(inputs, batch_size=1, default_dim=8)
    try:
        source_session = cpu_session(source_path)
        reference = source_session.run(None, session_feeds(source_session, feeds))
    except Exception as exc:
        logger.info("quantize: not comparing outputs, the source model cannot run (%s)", exc)
        reference = None
    try:
        quantized_session = cpu_session(quantized_path)
        quantized = quantized_session.run(None, session_feeds(quantized_session, feeds))
    except Exception as exc:
        if reference is None:
            return None
        raise PipelineError(
            f"onnxruntime cannot run the int8 model: {first_error_line(exc)}; limit op_types "
            '(e.g. ["MatMul"]) to leave the failing op type in float'
        ) from exc
    if reference is None:
        return None
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(reference, quantized, strict=False)
        if np.asarray(a).size
    ]
    return max(diffs, default=0.0)


class Quantize:
    """Dynamic int8 quantization with ``onnxruntime.quantization.quantize_dynamic``."""

    name: ClassVar[str] = "quantize"
    description: ClassVar[str] = (
        "Quantize an ONNX model's weights to int8 (dynamic quantization: no calibration data "
        "needed). Usually about 4x smaller and faster on CPU, at a small accuracy cost."
    )
    Settings: ClassVar[type[StageSettings]] = QuantizeSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Quantize the current ONNX artifact; the int8 model becomes the current one."""
        started = time.perf_counter()
        s = coerce_settings(QuantizeSettings, settings)
        source = ctx.current_artifact
        require_format(source, self.name, self.accepts)
        if source.precision == Precision.INT8.value:
            raise PipelineError(
                f"the model {source.key!r} is already int8: quantizing it again only adds error; "
                "remove this quantize stage or quantize its fp32 parent"
            )

        import onnxruntime
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        source_bytes = model_size_bytes(source.path)
        external = uses_external_data(source.path) or source_bytes > EXTERNAL_DATA_THRESHOLD
        stage_dir = ctx.stage_dir(stage_id)
        with scratch_dir(stage_dir) as scratch, staged_output(stage_dir, ONNX_FILENAME) as out:
            # Pre-processing (symbolic shape inference + graph cleanup) lets the quantizer see
            # shapes and fused patterns it otherwise misses; it is an improvement, not a need,
            # so a model it cannot handle is quantized as it is.
            progress(0.0, "pre-processing the model for quantization")
            to_quantize = source.path
            preprocessed = False
            try:
                pre = scratch / "preprocessed.onnx"
                quant_pre_process(source.path, str(pre), save_as_external_data=external)
                to_quantize, preprocessed = str(pre), True
            except Exception as exc:
                logger.warning(
                    "quantize %s: pre-processing failed (%s); quantizing the model as it is",
                    source.key,
                    first_error_line(exc),
                )

            progress(0.3, "quantizing weights to int8")
            try:
                quantize_dynamic(
                    to_quantize,
                    str(out),
                    op_types_to_quantize=s.op_types,
                    per_channel=s.per_channel,
                    reduce_range=s.reduce_range,
                    weight_type=QuantType.QInt8,
                    use_external_data_format=external,
                )
            except Exception as exc:
                raise PipelineError(f"int8 quantization failed: {first_error_line(exc)}") from exc

            ops = op_types(out)
            quantized_nodes = _quantized_node_count(ops)
            if quantized_nodes == 0:
                present = ", ".join(sorted(Counter(op_types(source.path)))) or "none"
                wanted = f"the op types {s.op_types}" if s.op_types else "any op type it supports"
                raise PipelineError(
                    f"nothing was quantized: the model has none of {wanted} "
                    f"(its op types: {present})"
                )

            progress(0.7, "checking that onnxruntime runs the int8 model")
            inputs, outputs = read_tensor_specs(out)
            max_abs_diff = _check_runs(source.path, out, inputs)

        final = stage_dir / ONNX_FILENAME
        out_bytes = model_size_bytes(final)
        size_ratio = out_bytes / source_bytes if source_bytes else 1.0
        diff_metric = {} if max_abs_diff is None else {"max_abs_diff": max_abs_diff}
        artifact = Artifact(
            key=stage_id,
            path=str(final),
            format=ModelFormat.ONNX.value,
            precision=Precision.INT8.value,
            inputs=inputs,
            outputs=outputs,
            parent=source.key,
            produced_by=self.name,
            metrics={"size_ratio": size_ratio, "size_bytes": float(out_bytes), **diff_metric},
            meta={
                "mode": s.mode,
                "preprocessed": preprocessed,
                "onnxruntime_version": onnxruntime.__version__,
                "settings": settings_meta(s),
            },
        )
        ctx.add_artifact(artifact)
        progress(1.0, "quantized")
        note = "" if preprocessed else " (pre-processing failed; quantized the model as it is)"
        return timed_result(
            stage_id,
            self.name,
            started,
            outputs=[artifact.key],
            metrics={
                "size_ratio": size_ratio,
                "quantized_nodes": float(quantized_nodes),
                **diff_metric,
            },
            message=(
                f"int8 dynamic quantization: {quantized_nodes} quantized nodes, "
                f"{human_bytes(source_bytes)} -> {human_bytes(out_bytes)} "
                f"(x{size_ratio:.2f}){note}"
            ),
        )
