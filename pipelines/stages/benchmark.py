"""benchmark: latency, throughput and memory of a model's lineage, measured together.

The stage times the job's input, every ancestor back to the upload (``ctx.ancestors``: the
registered versions it descends from, keyed ``version-<pk>``) and each artifact the pipeline
produced, **interleaved in one run**: per batch size every target is loaded, given inputs at the
stated shapes and warmed up at that shape (TorchScript re-specialises per shape), then timed in
round-robin windows (``pipelines.latency.measure_interleaved``) until each target's last three
windows agree. Models timed after one another on a busy worker do not compare (an FP32 baseline's
p50 ranged 56-111 ms across six jobs on one worker); models timed in alternating windows share
the machine's mood, so their ratios do. Sub-millisecond calls are timed in loops of calls.

Speedups are ratios of rows of this run only, at the same batch size and shapes, and only when
both rows are steady: ``speedup_vs_parent.<key>.b<batch>`` (the artifact's parent's p50 over its
own), ``speedup_vs_upload.<key>.b<batch>`` (the upload, the root of the lineage, over it) and
the older ``speedup.<key>.b<batch>`` (the job's input over it). A ratio above
``MAX_CREDIBLE_SPEEDUP`` (50x) is not reported: the stage message names it as unsteady.

Each dynamic axis gets a size: ``dynamic_dims`` by name, else 1, which the message says; every
row records the shapes it was timed at.

Models are loaded and called through ``pipelines.engines`` (the same engines certification and
serving run): ONNX with onnxruntime (CPU, or the CUDA provider where the benchmark runs on a GPU
and onnxruntime has it), TorchScript with torch, AOTInductor packages with
``torch._inductor.aoti_load_package`` (on the device they were compiled for), TensorRT engines with
the TensorRT runtime (GPU only; skipped with a note elsewhere).

Memory: every target is held loaded for the whole stage (interleaving needs them all at once; a
lineage too large to hold together is not handled yet). ``model_rss_mb`` is the RSS growth from
loading each engine (they load one at a time); ``peak_rss_mb`` is the process's peak while a batch
size was timed, all engines loaded, so it is the same for every row of that batch size; on CUDA
``gpu_mem_mb`` is the torch allocation the engine's load added plus the peak of one call (plus
the engine's scratch memory for TensorRT).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
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
    MAX_CREDIBLE_SPEEDUP,
    WindowSettings,
    peak_rss_mb,
    reset_peak_rss,
    rss_mb,
)
from pipelines.onnx_io import describe_inputs, first_error_line, fixed_batch, random_inputs
from pipelines.speedups import BASELINE, speedups_of
from pipelines.stages.base import Stage, StageOutcome, require_format

__all__ = ["BASELINE", "Benchmark", "BenchmarkSettings"]

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
            "all: every artifact of the pipeline so far and every ancestor of the job's input "
            "back to the upload, timed together; current: only the latest one, with the job's "
            "input and the references its speedups need (its parent and the upload)."
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
    """The artifacts to measure, in lineage order: the ancestors from the upload down, then the
    input, then what the pipeline made. "current" keeps the current artifact, the input, and
    the references its speedups need (its parent and its upload)."""
    ranked = [*reversed(ctx.ancestors.values()), *ctx.artifacts.values()]
    if targets == "current":
        require_format(ctx.current_artifact, Benchmark.name, accepts)
        wanted = {ctx.current_artifact.key, BASELINE}
        for artifact in (ctx.current_artifact, ctx.artifacts.get(BASELINE)):
            lineage = ctx.lineage(artifact) if artifact is not None else []
            wanted |= {lineage[0].key, lineage[-1].key} if lineage else set()
        ranked = [a for a in ranked if a.key in wanted]
    chosen = [a for a in ranked if a.format in ENGINE_FORMATS]
    return list({a.key: a for a in chosen}.values())


@dataclass
class _Target:
    """One loaded target: its engine (None when it cannot run here) and the batch sizes it takes."""

    artifact: Artifact
    specs: list[TensorSpec]
    engine: Engine | None
    batch_sizes: list[int]
    model_rss: float = 0.0
    load_gpu_bytes: int = 0


def _load(
    artifact: Artifact, s: BenchmarkSettings, device: str, workdir: Path, notes: list[str]
) -> _Target:
    """Load one target (with the RSS and CUDA memory its load added), or say why not."""
    present = Path(artifact.path).is_file()
    specs = input_specs(artifact) if present else []
    fixed = fixed_batch(specs)
    runnable = [b for b in s.batch_sizes if fixed is None or b == fixed]
    skipped = [b for b in s.batch_sizes if b not in runnable]
    if not present:
        notes.append(f"{artifact.key}: skipped, its file is missing")
        return _Target(artifact, specs, None, [])
    if not specs:
        notes.append(f"{artifact.key}: skipped, it declares no inputs")
        return _Target(artifact, specs, None, [])
    if skipped:
        notes.append(
            f"{artifact.key}: skipped batch size {', '.join(map(str, skipped))} "
            f"(its batch dim is fixed at {fixed})"
        )
    reset_peak_rss()
    before, gpu_before = rss_mb(), _cuda_allocated()
    try:
        engine: Engine | None = load_engine(artifact, device, cache_root_for(workdir))
    except EngineUnavailable as exc:
        notes.append(f"{artifact.key}: skipped, {exc}")
        engine = None
    after = rss_mb()
    model_rss = max(after - before, 0.0) if before is not None and after is not None else 0.0
    load_gpu = max(_cuda_allocated() - gpu_before, 0)
    return _Target(artifact, specs, engine, runnable, model_rss, load_gpu)


def _cuda_allocated() -> int:
    """Bytes torch has allocated on the GPU now; 0 where torch has no CUDA (not imported)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return int(torch.cuda.memory_allocated())


class Benchmark(Stage[BenchmarkSettings]):
    """Measure latency percentiles, throughput and memory with random inputs, side by side."""

    name: ClassVar[str] = "benchmark"
    description: ClassVar[str] = (
        "Measure p50/p90/p95/p99 latency, throughput and memory of the models at several batch "
        "sizes with random inputs, the job's input, its ancestors back to the upload and what the "
        "pipeline made timed together in alternating windows until they agree; speedups are "
        "given against each model's parent and against the upload."
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
        notes: list[str] = []
        # Every engine is held for the whole stage: interleaving needs them all loaded at once.
        loaded = [_load(a, s, device, ctx.workdir, notes) for a in artifacts]

        rows: list[BenchmarkRow] = []
        total = len(loaded) * len(s.batch_sizes)
        done = 0
        for batch_size in s.batch_sizes:
            measured = _measure_batch(loaded, batch_size, s, notes)
            for target in loaded:
                done += 1
                key = target.artifact.key
                row = measured.get(key)
                if row is None:
                    progress(done / total, f"{key} batch {batch_size}: skipped")
                    continue
                rows.append(row)
                steady = "" if row.converged else f", not steady after {row.windows} windows"
                progress(done / total, f"{key} batch {batch_size}: p50 {row.p50_ms:.3g} ms{steady}")
        del loaded  # release the models

        order = {a.key: i for i, a in enumerate(artifacts)}
        rows.sort(key=lambda r: (order[r.artifact], s.batch_sizes.index(r.batch_size)))
        metrics = _row_metrics(rows)
        speedups, suspicious = speedups_of(rows, ctx, s.agreement)
        metrics.update(speedups)
        unsteady = sorted({f"{r.artifact} b{r.batch_size}" for r in rows if not r.converged})
        if unsteady:
            notes.append(
                f"not steady (windows disagreed by more than {s.agreement:.0%}): "
                + ", ".join(unsteady)
            )
        if suspicious:
            notes.append(
                f"unsteady, not reported (over {MAX_CREDIBLE_SPEEDUP:g}x, or a ratio that moved "
                f"more than {s.agreement:.0%} between rounds): " + ", ".join(suspicious)
            )
        # Added only now, so a benchmark that fails or is cancelled half-way leaves no rows. A new
        # row replaces an earlier one of the same (artifact, backend, batch size): a re-run after
        # an upstream stage ran again measures a new file under the same key.
        done_keys = {(r.artifact, r.backend, r.batch_size) for r in rows}
        ctx.benchmarks[:] = [
            r for r in ctx.benchmarks if (r.artifact, r.backend, r.batch_size) not in done_keys
        ] + rows
        together = len({r.artifact for r in rows})
        message = (
            f"measured {len(rows)} (model, batch size) pairs on {device}, "
            f"{together} model{'s' if together != 1 else ''} timed together"
        )
        defaulted = _defaulted_dims([t for a in artifacts for t in a.inputs], s)
        if defaulted:
            # Said, not hidden: a sequence timed at length 1 is not the model's real cost.
            notes.append(
                f"dynamic dims {', '.join(defaulted)} timed at 1 (set dynamic_dims, e.g. "
                f'{{"{defaulted[0]}": 128}}, for the length you serve)'
            )
        if notes:
            message += "; " + "; ".join(notes)
        return StageOutcome(metrics=metrics, message=message)


def _measure_batch(
    loaded: list[_Target], batch_size: int, s: BenchmarkSettings, notes: list[str]
) -> dict[str, BenchmarkRow]:
    """Every target that takes ``batch_size``, prepared, warmed up and timed together."""
    ready = []
    for target in loaded:
        if target.engine is None or batch_size not in target.batch_sizes:
            continue
        problem = target.engine.batch_problem(batch_size)
        if problem is not None:
            notes.append(f"{target.artifact.key}: skipped batch size {batch_size}, {problem}")
            continue
        ready.append(target)
    if not ready:
        return {}
    calls: dict[str, Callable[[], object]] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    gpu: dict[str, float | None] = {}
    with ExitStack() as stack:
        for target in ready:
            stack.enter_context(target.engine.context())  # type: ignore[union-attr]
        for target in ready:
            key = target.artifact.key
            calls[key], shapes[key], gpu[key] = _prepare(target, batch_size, s)
        reset_peak_rss()
        stats = s.windows().measure_interleaved(calls)
    peak = peak_rss_mb()
    rows = {}
    for target in ready:
        key = target.artifact.key
        st = stats[key]
        rows[key] = BenchmarkRow(
            artifact=key,
            backend=target.engine.backend,  # type: ignore[union-attr]
            batch_size=batch_size,
            p50_ms=st.p50_ms,
            p95_ms=st.p95_ms,
            p99_ms=st.p99_ms,
            throughput=st.throughput(batch_size),
            iterations=st.iterations,
            p90_ms=st.p90_ms,
            windows=st.windows,
            converged=st.converged,
            peak_rss_mb=round(peak, 2) if peak is not None else 0.0,
            model_rss_mb=round(target.model_rss, 2),
            gpu_mem_mb=gpu[key],
            shapes=shapes[key],
            window_p50_ms=[round(v, 6) for v in st.window_p50_ms],
            spread=round(st.spread, 4),
        )
    return rows


def _prepare(
    target: _Target, batch_size: int, s: BenchmarkSettings
) -> tuple[Callable[[], object], dict[str, list[int]], float | None]:
    """The target's call on random inputs at the stated shapes, called once (a failure gets a
    message, not a traceback), its inputs' shapes, and on CUDA its memory in MiB."""
    engine, artifact, specs = target.engine, target.artifact, target.specs
    assert engine is not None
    arrays = random_inputs(specs, batch_size, s.dynamic_dims, default_dim=1, seed=batch_size)
    shapes = {name: [int(d) for d in a.shape] for name, a in arrays.items()}
    torch_cuda = None
    if engine.torch_cuda:
        import torch

        torch_cuda = torch.cuda
        base = torch_cuda.memory_allocated()
        torch_cuda.reset_peak_memory_stats()
    try:
        run_once = engine.prepare(arrays)
        run_once()
    except Exception as exc:
        named = sorted({d for spec in specs for d in spec.shape[1:] if isinstance(d, str)})
        hint = f"; set dynamic_dims for {', '.join(named)}" if named else ""
        raise PipelineError(
            f"{artifact.key} ({artifact.format}) fails on an input of shape "
            f"{describe_inputs(arrays)}: {first_error_line(exc)}{hint}"
        ) from exc
    gpu_mb = None
    if torch_cuda is not None:
        one_call = max(torch_cuda.max_memory_allocated() - base, 0)
        used = target.load_gpu_bytes + one_call + engine.extra_gpu_bytes()
        gpu_mb = round(used / MIB, 2)
    return run_once, shapes, gpu_mb


def _row_metrics(rows: list[BenchmarkRow]) -> dict[str, float]:
    """``<artifact>.b<batch>.<stat>`` for every row."""
    metrics: dict[str, float] = {}
    for row in rows:
        prefix = f"{row.artifact}.b{row.batch_size}"
        metrics[f"{prefix}.p50_ms"] = row.p50_ms
        metrics[f"{prefix}.p90_ms"] = row.p90_ms
        metrics[f"{prefix}.p95_ms"] = row.p95_ms
        metrics[f"{prefix}.p99_ms"] = row.p99_ms
        metrics[f"{prefix}.throughput"] = row.throughput
        metrics[f"{prefix}.peak_rss_mb"] = row.peak_rss_mb
        if row.gpu_mem_mb is not None:
            metrics[f"{prefix}.gpu_mem_mb"] = row.gpu_mem_mb
    return metrics


def _defaulted_dims(specs: list[TensorSpec], s: BenchmarkSettings) -> list[str]:
    """The named dims past the batch that no setting sized (random_inputs gives them 1)."""
    named = {d for spec in specs for d in spec.shape[1:] if isinstance(d, str)}
    return sorted(named - set(s.dynamic_dims))
