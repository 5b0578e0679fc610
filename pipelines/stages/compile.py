"""compile: one interface, several backends (onnxruntime, AOTInductor, TensorRT).

``settings.backend`` names the backend, or "auto" (the default): the best one this worker can run
for the model, TensorRT where there is a CUDA GPU and tensorrt imports (and the model suits it),
else onnxruntime. Each backend declares the formats it takes (``pipelines.backends.BACKEND_INFO``)
and ``Compile.accepts_for`` / ``produces_for`` expose them to ``validate_pipeline``, so a pipeline
asking AOTInductor to compile an ONNX model is refused before it is queued.

Backends write into a staging folder (published when the stage succeeds) and keep their caches
under ``<jobs folder>/cache`` (Inductor's, TensorRT's timing caches), inside the platform's
storage.

Whatever the backend, the compiled model is then judged against its source
(:mod:`pipelines.judging`) on inputs generated from the declared shapes (named dims at their
``dim_ranges`` opt size): top-1 agreement for a classifier, held to ``min_agreement``, else the
least per-row cosine, held to ``min_cosine``. One under its threshold is not published or
registered (unless ``keep_below_threshold``): the stage ends NOT_KEPT and later stages use the
source. A source that cannot run the generated inputs leaves the compile unjudged, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import ValidationError

from pipelines.backends import (
    AUTO,
    AUTO_ORDER,
    BACKEND_INFO,
    CompiledModel,
    available_backends,
    cache_root_for,
    resolve_backend,
)
from pipelines.backends.aotinductor_build import compile_aotinductor
from pipelines.backends.check import cause, run_once
from pipelines.backends.settings import CompileSettings
from pipelines.backends.tensorrt import compile_tensorrt
from pipelines.backends.tensorrt_graph import check_int8, onnx_quantization, profile_shapes
from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
    TensorSpec,
)
from pipelines.engines import EngineOptions, load_engine
from pipelines.judging import Judgement, Unjudgeable, judge
from pipelines.onnx_io import (
    CPU_PROVIDERS,
    EXTERNAL_DATA_THRESHOLD,
    cpu_session,
    first_error_line,
    model_size_bytes,
    op_types,
    random_inputs,
    read_tensor_specs,
    uses_external_data,
)
from pipelines.stages.base import (
    ONNX_FILENAME,
    Formats,
    Stage,
    StageOutcome,
    not_kept,
    require_format,
    settings_meta,
)
from pipelines.staging import staging_area

__all__ = [
    "BACKENDS",
    "Compile",
    "CompileFn",
    "CompiledModel",
    "choose_backend",
    "compile_onnxruntime",
    "onnxruntime_providers",
]


class CompileFn(Protocol):
    """A backend: compiles ``source`` into files it writes in ``out_dir`` (a staging folder
    published into the stage directory when the stage succeeds), reports progress in 0..1, keeps
    any cache under ``cache_root``, and returns which file is the model."""

    def __call__(
        self,
        source: Artifact,
        out_dir: Path,
        settings: CompileSettings,
        progress: ProgressFn,
        *,
        cache_root: Path,
    ) -> CompiledModel: ...


def onnxruntime_providers(requested: str) -> list[str]:
    """The execution providers for a providers setting ("auto", "cpu" or "cuda")."""
    import onnxruntime as ort

    if requested == "cpu":
        return list(CPU_PROVIDERS)
    has_provider = "CUDAExecutionProvider" in ort.get_available_providers()
    reason = None
    if not has_provider:
        reason = "this worker's onnxruntime has no CUDA execution provider (onnxruntime-gpu)"
    else:
        from pipelines.backends import cuda_reason

        reason = cuda_reason()
    if reason is None:
        return ["CUDAExecutionProvider", *CPU_PROVIDERS]
    if requested == "cuda":
        raise PipelineError(f"providers cuda was asked for but {reason}")
    return list(CPU_PROVIDERS)


def _session(path: str | Path, options: Any, providers: list[str]) -> Any:
    if providers == CPU_PROVIDERS:
        return cpu_session(path, options)
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def compile_onnxruntime(
    source: Artifact,
    out_dir: Path,
    settings: CompileSettings,
    progress: ProgressFn,
    *,
    cache_root: Path | None = None,
) -> CompiledModel:
    """Save onnxruntime's optimised graph of ``source`` and prove the saved file runs.

    onnxruntime optimises a graph every time it loads it; saving the result
    (``SessionOptions.optimized_model_filepath``) moves that work from every serving start to here
    and makes the optimised graph inspectable. ``cache_root`` is unused (no cache).
    """
    import onnxruntime as ort

    providers = onnxruntime_providers(settings.providers)
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
        # The compile itself: onnxruntime writes the graph it optimised while loading.
        optimiser = _session(source.path, options, providers)
    except Exception as exc:
        raise PipelineError(
            f"onnxruntime could not optimise the model: {first_error_line(exc)}"
        ) from exc
    if not out_path.is_file():
        raise PipelineError("onnxruntime did not write the optimised model")

    progress(0.6, "loading the optimised model")
    inputs, outputs = read_tensor_specs(out_path)
    optimised_artifact = Artifact(
        key="the optimised model",
        path=str(out_path),
        format=ModelFormat.ONNX.value,
        precision=source.precision,
        inputs=inputs,
        outputs=outputs,
    )
    device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    try:
        engine = load_engine(
            optimised_artifact, device, options=EngineOptions(threads=settings.intra_op_threads)
        )
    except Exception as exc:
        raise PipelineError(
            f'the optimised model does not load: {cause(exc)}; try graph_optimization_level "basic"'
        ) from exc

    # Run it once, so a graph that loads but cannot run fails here with a hint; how far its
    # answers moved from the source's is the stage's judgement (pipelines.judging).
    metrics: dict[str, float] = {
        "nodes_before": float(len(op_types(source.path))),
        "nodes_after": float(len(op_types(out_path))),
    }
    feeds = random_inputs(inputs, batch_size=1, default_dim=8)
    try:
        run_once(engine, feeds)
    except Exception as exc:
        raise PipelineError(
            f'the optimised model fails to run: {cause(exc)}; try graph_optimization_level "basic"'
        ) from exc

    return CompiledModel(
        filename=out_path.name,
        format=ModelFormat.ONNX.value,
        backend="onnxruntime",
        meta={
            "onnxruntime_version": ort.__version__,
            "providers": optimiser.get_providers(),
            "graph_optimization_level": settings.graph_optimization_level,
        },
        metrics=metrics,
        summary=settings.graph_optimization_level,
    )


# Backend name -> compile function. A new backend adds its name to BackendName, its description
# to pipelines.backends.BACKEND_INFO and its function here; the stage itself does not change.
BACKENDS: dict[str, CompileFn] = {
    "onnxruntime": compile_onnxruntime,
    "aotinductor": compile_aotinductor,
    "tensorrt": compile_tensorrt,
}


def tensorrt_problem(source: Artifact, settings: CompileSettings) -> str | None:
    """Why TensorRT cannot build ``source`` with ``settings`` (None: it can), without a GPU."""
    if source.format != ModelFormat.ONNX.value:
        return f"it takes onnx, the model is {source.format}"
    try:
        check_int8(onnx_quantization(source.path), settings.int8)
        inputs, _ = read_tensor_specs(source.path)
        profile_shapes(
            inputs,
            settings.min_batch,
            settings.opt_batch,
            settings.max_batch,
            {k: list(v) for k, v in settings.dim_ranges.items()},
        )
    except PipelineError as exc:
        return str(exc)
    return None


def choose_backend(
    source: Artifact,
    settings: CompileSettings,
    available: Mapping[str, str | None] | None = None,
) -> tuple[str, CompileSettings, str]:
    """(backend, settings it runs with, a note on the choice) for ``source`` on this worker.

    A named backend must be available (else a PipelineError with the reason). "auto" takes the
    first of AUTO_ORDER that is available and suits the model: TensorRT is skipped for a model it
    cannot build (dynamically quantized, or dynamic dims without dim_ranges); an explicitly
    quantized (Q/DQ) model is built with int8.
    """
    status = available_backends() if available is None else available
    if settings.backend != AUTO:
        return resolve_backend(settings.backend, status), settings, ""
    notes: list[str] = []
    for name in AUTO_ORDER:
        reason = status.get(name, f"{name}: unknown")
        if reason is not None:
            notes.append(reason)
            continue
        chosen = settings
        if name == "tensorrt":
            if source.format == ModelFormat.ONNX.value and onnx_quantization(source.path).has_qdq:
                chosen = settings.model_copy(update={"int8": True})
            problem = tensorrt_problem(source, chosen)
            if problem is not None:
                notes.append(f"tensorrt: {problem}")
                continue
        note = f"auto picked {name}" + (f" ({'; '.join(notes)})" if notes else "")
        return name, chosen, note
    raise PipelineError(f"no compile backend can run on this worker: {'; '.join(notes)}")


def _backend(settings: StageSettings) -> str:
    """The backend compile settings name (any other settings: auto)."""
    return settings.backend if isinstance(settings, CompileSettings) else AUTO


class Compile(Stage[CompileSettings]):
    """Compile the current model for a runtime chosen by ``settings.backend``."""

    name: ClassVar[str] = "compile"
    description: ClassVar[str] = (
        "Compile the model ahead of time for a runtime: onnxruntime (an optimised ONNX graph), "
        "AOTInductor (a .pt2 package from TorchScript) or TensorRT (an engine for one GPU "
        "model); auto picks the best this worker has."
    )
    Settings: ClassVar[type[StageSettings]] = CompileSettings
    # Every format some backend takes; accepts_for narrows it to the chosen backend's.
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.ONNX.value, ModelFormat.TORCHSCRIPT.value)
    # What the default (auto) makes on a CPU worker; produces_for says it per backend.
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    @classmethod
    def accepts_for(cls, settings: StageSettings) -> tuple[str, ...]:
        """The formats compile takes with these settings (its backend's)."""
        backend = _backend(settings)
        if backend == AUTO:
            return tuple(dict.fromkeys(f for n in AUTO_ORDER for f in BACKEND_INFO[n].accepts))
        return BACKEND_INFO[backend].accepts

    @classmethod
    def produces_for(cls, settings: StageSettings) -> Formats:
        """The format compile leaves; for auto, each format it may leave (decided on the worker)."""
        backend = _backend(settings)
        if backend == AUTO:
            made = [BACKEND_INFO[n].produces for n in reversed(AUTO_ORDER)]
            return tuple(dict.fromkeys(made))
        return BACKEND_INFO[backend].produces

    @classmethod
    def narrow_for(cls, settings: StageSettings, formats: tuple[str, ...]) -> StageSettings | None:
        """For "auto" followed by a stage that takes only some of its formats: the settings
        naming the one backend that makes them (None: no single one, or its settings refuse)."""
        if _backend(settings) != AUTO:
            return None
        fits = [n for n in AUTO_ORDER if BACKEND_INFO[n].produces in formats]
        if len(fits) != 1:
            return None
        try:
            return CompileSettings.model_validate({**settings.model_dump(), "backend": fits[0]})
        except ValidationError:
            return None

    @classmethod
    def format_hint(cls, settings: StageSettings) -> str:
        """Which backend takes which format, for a format refusal's message."""
        by_format: dict[str, list[str]] = {}
        for info in BACKEND_INFO.values():
            for fmt in info.accepts:
                by_format.setdefault(fmt, []).append(info.name)
        return "; ".join(
            f"backend {' and '.join(names)} take{'s' if len(names) == 1 else ''} {fmt}"
            for fmt, names in by_format.items()
        )

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: CompileSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Compile the current artifact and judge it; the compiled model becomes the current one
        unless it is under its threshold."""
        source = ctx.current_artifact
        name, effective, note = choose_backend(source, s)
        require_format(source, f"{self.name} (backend {name})", BACKEND_INFO[name].accepts)
        backend = BACKENDS[name]

        stage_dir = ctx.stage_dir(stage_id)
        progress(0.0, note or f"compiling for {name}")
        try:
            with staging_area(stage_dir) as area:
                compiled = backend(
                    source, area.dir, effective, progress, cache_root=cache_root_for(ctx.workdir)
                )
                area.main = compiled.filename
                artifact = _compiled_artifact(stage_id, source, compiled, area.dir, s, note)
                judgement, unjudged = _judge(ctx, source, artifact, effective, progress)
                verdict = _verdict(s, judgement)
                if verdict is not None and not s.keep_below_threshold:
                    raise _NotKept(verdict, judgement, compiled)
        except _NotKept as refused:
            return self._refused(s, source, refused)
        final = stage_dir / compiled.filename
        artifact.path = str(final)
        artifact.metrics["size_bytes"] = float(model_size_bytes(final))
        metrics = dict(compiled.metrics)
        if judgement is not None:
            artifact.meta["judgement"] = judgement.meta()
            metrics.setdefault("max_abs_diff", judgement.max_abs_diff)
            metrics.update(judgement.metrics())
            artifact.metrics.update(metrics)
        elif unjudged:
            artifact.meta["judgement"] = {"judged_on": None, "not_judged": unjudged}
        ctx.add_artifact(artifact)
        progress(1.0, "compiled")
        nodes = ""
        if "nodes_before" in metrics:
            nodes = f": {metrics['nodes_before']:.0f} -> {metrics['nodes_after']:.0f} nodes"
        summary = f" ({compiled.summary})" if compiled.summary else ""
        message = f"compiled for {compiled.backend}{summary}{nodes}"
        if judgement is not None:
            message += f"; {judgement.describe()}"
        if verdict is not None:
            message += f" ({verdict}, kept because keep_below_threshold is set)"
        if unjudged:
            message += f"; {unjudged}"
        if note:
            message += f"; {note}"
        return StageOutcome(outputs=[artifact.key], metrics=metrics, message=message)

    def _refused(self, s: CompileSettings, source: Artifact, refused: _NotKept) -> StageOutcome:
        j = refused.judgement
        return not_kept(
            refused.verdict,
            f"{j.describe()} against {source.key!r}; the {refused.compiled.backend} build is "
            "not registered (set keep_below_threshold to keep it); later stages use the source",
            settings=s,
            parent=source.key,
            metrics={**refused.compiled.metrics, "max_abs_diff": j.max_abs_diff, **j.metrics()},
            details={"judgement": j.meta(), "backend": refused.compiled.backend},
        )


class _NotKept(Exception):
    """Raised inside the staging block so that a compiled model under its threshold is never
    published."""

    def __init__(self, verdict: str, judgement: Judgement, compiled: CompiledModel) -> None:
        super().__init__(verdict)
        self.verdict = verdict
        self.judgement = judgement
        self.compiled = compiled


def _compiled_artifact(
    stage_id: str,
    source: Artifact,
    compiled: CompiledModel,
    where: Path,
    s: CompileSettings,
    note: str,
) -> Artifact:
    """The compiled model as an artifact, its file still in the staging folder ``where``."""
    path = where / compiled.filename
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    if compiled.inputs is not None and compiled.outputs is not None:
        inputs, outputs = list(compiled.inputs), list(compiled.outputs)
    elif compiled.format == ModelFormat.ONNX.value:
        inputs, outputs = read_tensor_specs(path)
    else:
        inputs, outputs = list(source.inputs), list(source.outputs)
    meta = {**compiled.meta, "settings": settings_meta(s)}
    if note:
        meta["backend_choice"] = note
    return Artifact(
        key=stage_id,
        path=str(path),
        format=compiled.format,
        precision=compiled.precision or source.precision,
        inputs=inputs,
        outputs=outputs,
        parent=source.key,
        backend=compiled.backend,
        produced_by=Compile.name,
        metrics={**compiled.metrics, "size_bytes": float(model_size_bytes(path))},
        meta=meta,
    )


def _judge(
    ctx: PipelineContext,
    source: Artifact,
    artifact: Artifact,
    s: CompileSettings,
    progress: ProgressFn,
) -> tuple[Judgement | None, str]:
    """The compiled model against its source on generated inputs (named dims at their
    ``dim_ranges`` opt size); (None, why) when the source cannot run them."""
    progress(0.99, "judging the compiled model against its source on generated inputs")
    sizes = {dim: opt for dim, (_, opt, _) in s.dim_ranges.items()}
    try:
        found = judge(
            source,
            artifact,
            ctx.task,
            dim_sizes=sizes,
            dim_sources={dim: "dim_ranges (opt)" for dim in sizes},
            candidate_device="auto",
            candidate_options=EngineOptions(cache_root=cache_root_for(ctx.workdir)),
        )
    except Unjudgeable as exc:
        return None, f"not judged: {exc}"
    return found, ""


def _verdict(s: CompileSettings, judgement: Judgement | None) -> str | None:
    """Why the compiled model is under its threshold (``min cosine 0.9712 < 0.9990``), or None."""
    if judgement is None:
        return None
    threshold = s.min_agreement if judgement.metric == "agreement" else s.min_cosine
    return None if judgement.passes(threshold) else judgement.verdict(threshold)
