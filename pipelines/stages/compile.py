"""compile: optimise an ONNX model ahead of time for one runtime (backend)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageResult,
    StageSettings,
    timed_result,
)
from pipelines.onnx_io import (
    EXTERNAL_DATA_THRESHOLD,
    cpu_session,
    first_error_line,
    model_size_bytes,
    op_types,
    random_inputs,
    read_tensor_specs,
    session_feeds,
    uses_external_data,
)
from pipelines.stages._common import ONNX_FILENAME, coerce_settings, require_format, settings_meta
from pipelines.staging import staging_area

GraphOptimizationLevel = Literal["basic", "extended", "all"]


class CompileSettings(StageSettings):
    """Settings of compile."""

    backend: Literal["onnxruntime"] = Field(
        "onnxruntime",
        description="Runtime to compile for. onnxruntime: a graph-optimised ONNX model for CPU.",
    )
    # "all" adds layout optimisations (NCHWc convolutions and the like) that are chosen for the
    # CPU doing the compiling; saved into the model, they only load on CPUs with the same
    # instruction set, so a version compiled on one worker could fail on a serving node.
    # "extended" (the fusions: Gemm+activation, attention, layer norm, ...) is portable.
    graph_optimization_level: GraphOptimizationLevel = Field(
        "extended",
        description=(
            "How far onnxruntime optimises the graph. basic: constant folding and redundant-node "
            "removal; extended: also operator fusions; all: also CPU-layout optimisations, which "
            "tie the saved model to CPUs like the one that compiled it."
        ),
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="Threads onnxruntime uses inside one operator; 0: one per core.",
    )


@dataclass
class CompiledModel:
    """What a backend made: its file (inside the staging folder) and what to record about it."""

    filename: str
    format: str
    backend: str
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


# A backend compiles ``source`` into files it writes in ``out_dir`` (a staging folder published
# into the stage directory when the stage succeeds), reports progress in 0..1, and returns which
# file is the model.
CompileFn = Callable[[Artifact, Path, CompileSettings, ProgressFn], CompiledModel]


def _max_abs_diff(reference: list[Any], other: list[Any]) -> float:
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(reference, other, strict=False)
        if np.asarray(a).size
    ]
    return max(diffs, default=0.0)


def compile_onnxruntime(
    source: Artifact, out_dir: Path, settings: CompileSettings, progress: ProgressFn
) -> CompiledModel:
    """Save onnxruntime's optimised graph of ``source`` and prove the saved file runs.

    onnxruntime optimises a graph every time it loads it; saving the result
    (``SessionOptions.optimized_model_filepath``) moves that work from every serving start to here
    and makes the optimised graph inspectable.
    """
    import onnxruntime as ort

    out_path = out_dir / ONNX_FILENAME
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[settings.graph_optimization_level]
    options.intra_op_num_threads = settings.intra_op_threads
    options.optimized_model_filepath = str(out_path)
    if uses_external_data(source.path) or model_size_bytes(source.path) > EXTERNAL_DATA_THRESHOLD:
        # A >2 GiB optimised graph cannot be one protobuf: keep the weights beside it.
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", out_path.name + ".data"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )

    progress(0.1, f"optimising the graph ({settings.graph_optimization_level})")
    try:
        cpu_session(source.path, options)
    except Exception as exc:
        raise PipelineError(
            f"onnxruntime could not optimise the model: {first_error_line(exc)}"
        ) from exc
    if not out_path.is_file():
        raise PipelineError("onnxruntime did not write the optimised model")

    progress(0.6, "loading the optimised model")
    check_options = ort.SessionOptions()
    check_options.intra_op_num_threads = settings.intra_op_threads
    try:
        session = cpu_session(out_path, check_options)
    except Exception as exc:
        raise PipelineError(
            f"the optimised model does not load: {first_error_line(exc)}; try "
            'graph_optimization_level "basic"'
        ) from exc

    # Run it once; compare with the source on the same input. Fusions change the order of
    # floating-point operations, so the difference is recorded, not held to a tolerance.
    metrics: dict[str, float] = {
        "nodes_before": float(len(op_types(source.path))),
        "nodes_after": float(len(op_types(out_path))),
    }
    inputs, _ = read_tensor_specs(out_path)
    feeds = random_inputs(inputs, batch_size=1, default_dim=8)
    try:
        optimised = session.run(None, session_feeds(session, feeds))
    except Exception as exc:
        raise PipelineError(
            f"the optimised model fails to run: {first_error_line(exc)}; try "
            'graph_optimization_level "basic"'
        ) from exc
    try:
        plain = ort.SessionOptions()
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        reference_session = cpu_session(source.path, plain)
        reference = reference_session.run(None, session_feeds(reference_session, feeds))
        metrics["max_abs_diff"] = _max_abs_diff(reference, optimised)
    except Exception:  # nothing to compare with is not a reason to fail the compile
        pass

    return CompiledModel(
        filename=out_path.name,
        format=ModelFormat.ONNX.value,
        backend="onnxruntime",
        meta={
            "onnxruntime_version": ort.__version__,
            "providers": session.get_providers(),
            "graph_optimization_level": settings.graph_optimization_level,
        },
        metrics=metrics,
    )


# Backend name -> compile function. A new backend (TensorRT) adds its name to the Literal of
# CompileSettings.backend and its function here; the stage itself does not change.
BACKENDS: dict[str, CompileFn] = {
    "onnxruntime": compile_onnxruntime,
}


class Compile:
    """Compile the current ONNX model for a runtime chosen by ``settings.backend``."""

    name: ClassVar[str] = "compile"
    description: ClassVar[str] = (
        "Optimise an ONNX model ahead of time for a runtime (onnxruntime for now): fused "
        "operators, folded constants, saved so serving starts faster."
    )
    Settings: ClassVar[type[StageSettings]] = CompileSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Compile the current ONNX artifact; the compiled model becomes the current one."""
        started = time.perf_counter()
        s = coerce_settings(CompileSettings, settings)
        source = ctx.current_artifact
        require_format(source, self.name, self.accepts)
        backend = BACKENDS.get(s.backend)
        if backend is None:
            raise PipelineError(
                f"unknown compile backend {s.backend!r}; available: {', '.join(sorted(BACKENDS))}"
            )

        stage_dir = ctx.stage_dir(stage_id)
        with staging_area(stage_dir) as area:
            compiled = backend(source, area.dir, s, progress)
            area.main = compiled.filename
        final = stage_dir / compiled.filename
        inputs, outputs = read_tensor_specs(final)
        metrics = {**compiled.metrics, "size_bytes": float(model_size_bytes(final))}
        artifact = Artifact(
            key=stage_id,
            path=str(final),
            format=compiled.format,
            precision=source.precision,
            inputs=inputs,
            outputs=outputs,
            parent=source.key,
            backend=compiled.backend,
            produced_by=self.name,
            metrics=metrics,
            meta={**compiled.meta, "settings": settings_meta(s)},
        )
        ctx.add_artifact(artifact)
        progress(1.0, "compiled")
        nodes = ""
        if "nodes_before" in metrics:
            nodes = f": {metrics['nodes_before']:.0f} -> {metrics['nodes_after']:.0f} nodes"
        return timed_result(
            stage_id,
            self.name,
            started,
            outputs=[artifact.key],
            metrics=compiled.metrics,
            message=f"compiled for {compiled.backend} ({s.graph_optimization_level}){nodes}",
        )
