"""benchmark: latency and throughput of the pipeline's artifacts at several batch sizes (CPU)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from pipelines.core import (
    Artifact,
    BenchmarkRow,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageResult,
    StageSettings,
    TensorSpec,
    timed_result,
)
from pipelines.latency import LatencyStats, measure_latency
from pipelines.onnx_io import (
    cpu_session,
    describe_inputs,
    first_error_line,
    fixed_batch,
    random_inputs,
    read_tensor_specs,
    session_feeds,
)
from pipelines.stages._common import coerce_settings, require_format

__all__ = [
    "Benchmark",
    "BenchmarkSettings",
    "LatencyStats",
    "measure_latency",
]

BatchSize = Annotated[int, Field(ge=1, le=4096)]
DimSize = Annotated[int, Field(ge=1, le=1_000_000)]


class BenchmarkSettings(StageSettings):
    """Settings of benchmark."""

    batch_sizes: list[BatchSize] = Field(
        default_factory=lambda: [1, 8, 32],
        min_length=1,
        max_length=16,
        description=(
            "Batch sizes to measure. A model whose batch dim is a fixed number is only measured "
            "at that size; the others are skipped with a note."
        ),
    )
    warmup: int = Field(
        10,
        ge=0,
        le=10_000,
        description="Untimed calls before measuring (arena allocation, JIT re-optimisation).",
    )
    iterations: int = Field(
        50,
        ge=5,
        le=100_000,
        description="Timed calls per artifact and batch size; p99 needs about 100 to mean much.",
    )
    min_seconds: float = Field(
        0.3,
        ge=0.0,
        le=600.0,
        description=(
            "Keep timing each artifact and batch size until this many seconds have passed as "
            "well, so a microsecond model is not judged on a sub-millisecond window."
        ),
    )
    targets: Literal["all", "current"] = Field(
        "all",
        description=(
            "all: every ONNX and TorchScript artifact of the pipeline so far (the upload "
            "included), to compare them; current: only the latest one."
        ),
    )
    dynamic_dims: dict[str, DimSize] = Field(
        default_factory=dict,
        description=(
            'Sizes of named dims other than the batch, e.g. {"seq": 128}; named dims not listed '
            "use 1."
        ),
    )

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        # Measuring a batch size twice only doubles the time; keep the user's order.
        return list(dict.fromkeys(value))


class _Runner:
    """Runs one artifact on prepared inputs; ``context`` wraps the timed loop."""

    backend: str

    def prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        raise NotImplementedError

    def context(self) -> AbstractContextManager[Any]:
        return contextlib.nullcontext()


class _OnnxRunner(_Runner):
    backend = "onnxruntime"

    def __init__(self, artifact: Artifact) -> None:
        # onnxruntime applies its default (full) graph optimisations when it loads a model, so
        # every ONNX artifact is measured as it would be served, compiled or not.
        self.session = cpu_session(artifact.path)

    def prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        session, feeds = self.session, session_feeds(self.session, arrays)
        return lambda: session.run(None, feeds)


class _TorchRunner(_Runner):
    backend = "torch"

    def __init__(self, artifact: Artifact) -> None:
        import torch

        self.torch = torch
        self.model = torch.jit.load(artifact.path, map_location="cpu").eval()
        self.specs = artifact.inputs

    def prepare(self, arrays: dict[str, np.ndarray]) -> Callable[[], object]:
        # Positional, in declared order: that is how the upload's inputs map to forward().
        tensors = tuple(self.torch.from_numpy(arrays[spec.name]) for spec in self.specs)
        model = self.model
        return lambda: model(*tensors)

    def context(self) -> AbstractContextManager[Any]:
        # No autograd bookkeeping, as when served; entered once around the loop, not per call.
        return self.torch.inference_mode()


_RUNNERS: dict[str, Callable[[Artifact], _Runner]] = {
    ModelFormat.ONNX.value: _OnnxRunner,
    ModelFormat.TORCHSCRIPT.value: _TorchRunner,
}


def _input_specs(artifact: Artifact) -> list[TensorSpec]:
    # For ONNX the file is the truth (an upload may declare its inputs loosely).
    if artifact.format == ModelFormat.ONNX.value:
        return read_tensor_specs(artifact.path)[0]
    return artifact.inputs


class Benchmark:
    """Measure latency percentiles and throughput with random inputs on the CPU."""

    name: ClassVar[str] = "benchmark"
    description: ClassVar[str] = (
        "Measure p50/p95/p99 latency and throughput of the models at several batch sizes on "
        "the CPU (onnxruntime for ONNX, torch for TorchScript), with random inputs."
    )
    Settings: ClassVar[type[StageSettings]] = BenchmarkSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value, ModelFormat.TORCHSCRIPT.value)
    produces: ClassVar[str | None] = None

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Benchmark the targets; rows go to ``ctx.benchmarks``, the current artifact stays."""
        started = time.perf_counter()
        s = coerce_settings(BenchmarkSettings, settings)
        if s.targets == "current":
            require_format(ctx.current_artifact, self.name, self.accepts)
            artifacts = [ctx.current_artifact]
        else:
            artifacts = [a for a in ctx.artifacts.values() if a.format in _RUNNERS]
        if not artifacts:
            raise PipelineError("there is no ONNX or TorchScript model to benchmark")

        rows: list[BenchmarkRow] = []
        metrics: dict[str, float] = {}
        notes: list[str] = []
        total = len(artifacts) * len(s.batch_sizes)
        done = 0
        for artifact in artifacts:
            present = Path(artifact.path).is_file()
            specs = _input_specs(artifact) if present else []
            fixed = fixed_batch(specs)
            runnable = [b for b in s.batch_sizes if fixed is None or b == fixed]
            skipped = [b for b in s.batch_sizes if b not in runnable]
            if not present:
                notes.append(f"{artifact.key}: skipped, its file is missing")
                runnable, skipped = [], []
            elif not specs:
                notes.append(f"{artifact.key}: skipped, it declares no inputs")
                runnable, skipped = [], []
            elif skipped:
                notes.append(
                    f"{artifact.key}: skipped batch size {', '.join(map(str, skipped))} "
                    f"(its batch dim is fixed at {fixed})"
                )
            runner = _load_runner(artifact) if runnable else None
            for batch_size in s.batch_sizes:
                done += 1
                if runner is None or batch_size not in runnable:
                    progress(done / total, f"{artifact.key} batch {batch_size}: skipped")
                    continue
                stats = _measure(runner, artifact, specs, batch_size, s)
                row = BenchmarkRow(
                    artifact=artifact.key,
                    backend=runner.backend,
                    batch_size=batch_size,
                    p50_ms=stats.p50_ms,
                    p95_ms=stats.p95_ms,
                    p99_ms=stats.p99_ms,
                    throughput=stats.throughput(batch_size),
                    iterations=stats.iterations,
                )
                rows.append(row)
                prefix = f"{artifact.key}.b{batch_size}"
                metrics[f"{prefix}.p50_ms"] = row.p50_ms
                metrics[f"{prefix}.p95_ms"] = row.p95_ms
                metrics[f"{prefix}.p99_ms"] = row.p99_ms
                metrics[f"{prefix}.throughput"] = row.throughput
                progress(
                    done / total, f"{artifact.key} batch {batch_size}: p50 {row.p50_ms:.3g} ms"
                )
            del runner  # release this model before the next one loads

        # Added only now, so a benchmark that fails or is cancelled half-way leaves no rows. A new
        # row replaces an earlier one of the same (artifact, backend, batch size): a re-run after
        # an upstream stage ran again measures a new file under the same key.
        measured = {(r.artifact, r.backend, r.batch_size) for r in rows}
        ctx.benchmarks[:] = [
            r for r in ctx.benchmarks if (r.artifact, r.backend, r.batch_size) not in measured
        ] + rows
        message = f"measured {len(rows)} (model, batch size) pairs"
        if notes:
            message += "; " + "; ".join(notes)
        return timed_result(stage_id, self.name, started, metrics=metrics, message=message)


def _load_runner(artifact: Artifact) -> _Runner:
    try:
        return _RUNNERS[artifact.format](artifact)
    except Exception as exc:
        raise PipelineError(
            f"cannot load {artifact.key} ({artifact.format}) to benchmark it: "
            f"{first_error_line(exc)}"
        ) from exc


def _measure(
    runner: _Runner,
    artifact: Artifact,
    specs: list[TensorSpec],
    batch_size: int,
    settings: BenchmarkSettings,
) -> LatencyStats:
    arrays = random_inputs(specs, batch_size, settings.dynamic_dims, default_dim=1, seed=batch_size)
    run_once = runner.prepare(arrays)
    with runner.context():
        try:
            run_once()  # one untimed call first, so a failure gets a message, not a traceback
        except Exception as exc:
            named = sorted({d for spec in specs for d in spec.shape[1:] if isinstance(d, str)})
            hint = f"; set dynamic_dims for {', '.join(named)}" if named else ""
            raise PipelineError(
                f"{artifact.key} ({artifact.format}) fails on an input of shape "
                f"{describe_inputs(arrays)}: {first_error_line(exc)}{hint}"
            ) from exc
        return measure_latency(
            run_once, settings.warmup, settings.iterations, min_seconds=settings.min_seconds
        )
