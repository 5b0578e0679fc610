"""benchmark: latency, throughput and memory of the pipeline's artifacts, side by side.

Every artifact is timed in windows (``pipelines.latency.measure_windows``) until three windows'
p50 agree, and the pipeline's input artifact is always measured too, run eagerly (TorchScript with
torch, ONNX with onnxruntime), as the baseline: ``speedup.<artifact>.b<batch>`` metrics are the
baseline's p50 over the artifact's at that batch size.

Models are loaded and called through ``pipelines.engines`` (the same engines certification and
serving run): ONNX with onnxruntime (CPU, or the CUDA provider where the benchmark runs on a GPU
and onnxruntime has it), TorchScript with torch, AOTInductor packages with
``torch._inductor.aoti_load_package`` (on the device they were compiled for), TensorRT engines with
the TensorRT runtime (GPU only; skipped with a note elsewhere).

Memory per row: the process's peak RSS (VmHWM, reset before each artifact is loaded where the
kernel allows), the RSS growth from loading the artifact, and on CUDA the peak torch allocation
(plus the engine's scratch memory for TensorRT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, field_validator

from pipelines.backends import cache_root_for
from pipelines.core import (
    Artifact,
    BenchmarkRow,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
    TensorSpec,
)
from pipelines.engines import (
    ENGINE_FORMATS,
    Engine,
    EngineUnavailable,
    input_specs,
    load_engine,
    resolve_device,
)
from pipelines.latency import (
    BENCHMARK_WINDOWS,
    WindowedStats,
    WindowSettings,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from pipelines.onnx_io import describe_inputs, first_error_line, fixed_batch, random_inputs
from pipelines.stages.base import Stage, StageOutcome, require_format

__all__ = ["BASELINE", "Benchmark", "BenchmarkSettings"]

# The key of the pipeline's input artifact: the baseline every speedup is relative to.
BASELINE = "input"
MIB = 1024.0 * 1024.0

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
        default=BENCHMARK_WINDOWS.warmup,
        ge=0,
        le=10_000,
        description="Untimed calls before measuring (arena allocation, JIT re-optimisation).",
    )
    iterations: int = Field(
        default=BENCHMARK_WINDOWS.iterations,
        ge=5,
        le=100_000,
        description=(
            "Timed calls per measurement window. The statistics pool the last three windows, so "
            "p99 rests on at least three times this many calls."
        ),
    )
    min_seconds: float = Field(
        default=BENCHMARK_WINDOWS.min_seconds,
        ge=0.0,
        le=600.0,
        description=(
            "Each window also lasts at least this many seconds, so a microsecond model is not "
            "judged on a sub-millisecond window."
        ),
    )
    agreement: float = Field(
        default=BENCHMARK_WINDOWS.agreement,
        ge=0.0,
        le=1.0,
        description=(
            "Windows are timed until the p50 of the last three agree within this fraction "
            "(0.10: the slowest is at most 10% slower than the fastest), or max_windows ran."
        ),
    )
    max_windows: int = Field(
        default=BENCHMARK_WINDOWS.max_windows,
        ge=1,
        le=100,
        description=(
            "Most windows per artifact and batch size; a row that used them all without three "
            "agreeing is marked not converged (its numbers are unsteady)."
        ),
    )
    targets: Literal["all", "current"] = Field(
        default="all",
        description=(
            "all: every artifact of the pipeline so far (the upload included), to compare them; "
            "current: only the latest one (and the upload, always measured as the baseline)."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description=(
            "Where TorchScript and ONNX models run: auto: the GPU when this worker has one, else "
            "the CPU. AOTInductor packages run on the device they were compiled for; TensorRT "
            "engines only on a GPU."
        ),
    )
    dynamic_dims: dict[str, DimSize] = Field(
        default_factory=dict,
        description=(
            'Sizes of named dims other than the batch, e.g. {"seq": 128}; named dims not listed '
            "use 1."
        ),
    )

    def windows(self) -> WindowSettings:
        """The windows these settings time with (certification times with the defaults)."""
        return WindowSettings(
            warmup=self.warmup,
            iterations=self.iterations,
            min_seconds=self.min_seconds,
            agreement=self.agreement,
            max_windows=self.max_windows,
        )

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        # Measuring a batch size twice only doubles the time; keep the user's order.
        return list(dict.fromkeys(value))


def _targets(ctx: PipelineContext, targets: str, accepts: tuple[str, ...]) -> list[Artifact]:
    """The artifacts to measure, the baseline (the input) first when it can be run."""
    if targets == "current":
        require_format(ctx.current_artifact, Benchmark.name, accepts)
        chosen = [ctx.current_artifact]
    else:
        chosen = [a for a in ctx.artifacts.values() if a.format in ENGINE_FORMATS]
    baseline = ctx.artifacts.get(BASELINE)
    if baseline is not None and baseline.format in ENGINE_FORMATS:
        chosen = [baseline, *[a for a in chosen if a.key != BASELINE]]
    return chosen


class Benchmark(Stage[BenchmarkSettings]):
    """Measure latency percentiles, throughput and memory with random inputs, side by side."""

    name: ClassVar[str] = "benchmark"
    description: ClassVar[str] = (
        "Measure p50/p90/p95/p99 latency, throughput and memory of the models at several batch "
        "sizes with random inputs, timing windows until they agree; the upload, run eagerly, is "
        "the baseline each model's speedup is given against."
    )
    Settings: ClassVar[type[StageSettings]] = BenchmarkSettings
    accepts: ClassVar[tuple[str, ...]] = (
        ModelFormat.ONNX.value,
        ModelFormat.TORCHSCRIPT.value,
        ModelFormat.AOTINDUCTOR.value,
        ModelFormat.TENSORRT.value,
    )
    produces: ClassVar[str | None] = None

    def _pre_run(self, ctx: PipelineContext, settings: BenchmarkSettings) -> None:
        """Nothing to check up front: the targets setting decides which artifacts are measured
        (the current one's format is checked only when it is the target)."""

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: BenchmarkSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Benchmark the targets; rows go to ``ctx.benchmarks``, the current artifact stays."""
        artifacts = _targets(ctx, s.targets, self.accepts)
        if not artifacts:
            raise PipelineError("there is no model this stage can benchmark")
        device = resolve_device(s.device)

        rows: list[BenchmarkRow] = []
        metrics: dict[str, float] = {}
        notes: list[str] = []
        total = len(artifacts) * len(s.batch_sizes)
        done = 0
        for artifact in artifacts:
            present = Path(artifact.path).is_file()
            specs = input_specs(artifact) if present else []
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
            runner: Engine | None = None
            model_rss = 0.0
            if runnable:
                reset_peak_rss()
                before = rss_mb()
                try:
                    runner = load_engine(artifact, device, cache_root_for(ctx.workdir))
                except EngineUnavailable as exc:
                    notes.append(f"{artifact.key}: skipped, {exc}")
                after = rss_mb()
                if before is not None and after is not None:
                    model_rss = max(after - before, 0.0)
            for batch_size in s.batch_sizes:
                done += 1
                problem = None
                if runner is not None and batch_size in runnable:
                    problem = runner.batch_problem(batch_size)
                if runner is None or batch_size not in runnable or problem is not None:
                    if runner is not None and problem is not None:
                        notes.append(f"{artifact.key}: skipped batch size {batch_size}, {problem}")
                    progress(done / total, f"{artifact.key} batch {batch_size}: skipped")
                    continue
                shapes: dict[str, list[int]] = {}
                stats, gpu_mb = _measure(runner, artifact, specs, batch_size, s, shapes)
                peak = peak_rss_mb()
                row = BenchmarkRow(
                    artifact=artifact.key,
                    backend=runner.backend,
                    batch_size=batch_size,
                    p50_ms=stats.p50_ms,
                    p95_ms=stats.p95_ms,
                    p99_ms=stats.p99_ms,
                    throughput=stats.throughput(batch_size),
                    iterations=stats.iterations,
                    p90_ms=stats.p90_ms,
                    windows=stats.windows,
                    converged=stats.converged,
                    peak_rss_mb=round(peak, 2) if peak is not None else 0.0,
                    model_rss_mb=round(model_rss, 2),
                    gpu_mem_mb=gpu_mb,
                    shapes=shapes,
                )
                rows.append(row)
                prefix = f"{artifact.key}.b{batch_size}"
                metrics[f"{prefix}.p50_ms"] = row.p50_ms
                metrics[f"{prefix}.p90_ms"] = row.p90_ms
                metrics[f"{prefix}.p95_ms"] = row.p95_ms
                metrics[f"{prefix}.p99_ms"] = row.p99_ms
                metrics[f"{prefix}.throughput"] = row.throughput
                metrics[f"{prefix}.peak_rss_mb"] = row.peak_rss_mb
                if row.gpu_mem_mb is not None:
                    metrics[f"{prefix}.gpu_mem_mb"] = row.gpu_mem_mb
                steady = "" if row.converged else f", not steady after {row.windows} windows"
                progress(
                    done / total,
                    f"{artifact.key} batch {batch_size}: p50 {row.p50_ms:.3g} ms{steady}",
                )
            del runner  # release this model before the next one loads

        metrics.update(_speedups(rows))
        unsteady = sorted({f"{r.artifact} b{r.batch_size}" for r in rows if not r.converged})
        if unsteady:
            notes.append(
                f"not steady (windows disagreed by more than {s.agreement:.0%}): "
                + ", ".join(unsteady)
            )
        # Added only now, so a benchmark that fails or is cancelled half-way leaves no rows. A new
        # row replaces an earlier one of the same (artifact, backend, batch size): a re-run after
        # an upstream stage ran again measures a new file under the same key.
        measured = {(r.artifact, r.backend, r.batch_size) for r in rows}
        ctx.benchmarks[:] = [
            r for r in ctx.benchmarks if (r.artifact, r.backend, r.batch_size) not in measured
        ] + rows
        message = f"measured {len(rows)} (model, batch size) pairs on {device}"
        defaulted = _defaulted_dims(ctx.current_artifact.inputs, s)
        if defaulted:
            # Said, not hidden: a sequence timed at length 1 is not the model's real cost.
            notes.append(
                f"dynamic dims {', '.join(defaulted)} timed at 1 (set dynamic_dims, e.g. "
                f'{{"{defaulted[0]}": 128}}, for the length you serve)'
            )
        if notes:
            message += "; " + "; ".join(notes)
        return StageOutcome(metrics=metrics, message=message)


def _speedups(rows: list[BenchmarkRow]) -> dict[str, float]:
    """``speedup.<artifact>.b<batch>``: the baseline's p50 over each other artifact's."""
    baseline = {r.batch_size: r.p50_ms for r in rows if r.artifact == BASELINE}
    return {
        f"speedup.{r.artifact}.b{r.batch_size}": baseline[r.batch_size] / r.p50_ms
        for r in rows
        if r.artifact != BASELINE and r.batch_size in baseline and r.p50_ms > 0
    }


def _defaulted_dims(specs: list[TensorSpec], s: BenchmarkSettings) -> list[str]:
    """The named dims past the batch that no setting sized (random_inputs gives them 1)."""
    named = {d for spec in specs for d in spec.shape[1:] if isinstance(d, str)}
    return sorted(named - set(s.dynamic_dims))


def _measure(
    runner: Engine,
    artifact: Artifact,
    specs: list[TensorSpec],
    batch_size: int,
    settings: BenchmarkSettings,
    shapes: dict[str, list[int]] | None = None,
) -> tuple[WindowedStats, float | None]:
    """Windowed latency of one artifact at one batch size, and its peak CUDA memory in MiB;
    ``shapes`` (when given) receives each input's shape as timed."""
    arrays = random_inputs(specs, batch_size, settings.dynamic_dims, default_dim=1, seed=batch_size)
    if shapes is not None:
        shapes.update({name: [int(d) for d in a.shape] for name, a in arrays.items()})
    torch_cuda = None
    if runner.torch_cuda:
        import torch

        torch_cuda = torch.cuda
        torch_cuda.reset_peak_memory_stats()
    with runner.context():
        try:
            run_once = runner.prepare(arrays)
            run_once()  # one untimed call first, so a failure gets a message, not a traceback
        except Exception as exc:
            named = sorted({d for spec in specs for d in spec.shape[1:] if isinstance(d, str)})
            hint = f"; set dynamic_dims for {', '.join(named)}" if named else ""
            raise PipelineError(
                f"{artifact.key} ({artifact.format}) fails on an input of shape "
                f"{describe_inputs(arrays)}: {first_error_line(exc)}{hint}"
            ) from exc
        stats = settings.windows().measure(run_once)
    gpu_mb = None
    if torch_cuda is not None:
        gpu_mb = round((torch_cuda.max_memory_allocated() + runner.extra_gpu_bytes()) / MIB, 2)
    return stats, gpu_mb
