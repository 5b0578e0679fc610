"""compile: one interface, several backends (onnxruntime, AOTInductor, TensorRT).

``settings.backend`` names the backend, or "auto" (the default): the best one this worker can run
for the model, TensorRT where there is a CUDA GPU and tensorrt imports (and the model suits it),
else onnxruntime. Each backend declares the formats it takes (``pipelines.backends.BACKEND_INFO``)
and ``Compile.accepts_for`` / ``produces_for`` expose them to ``validate_pipeline``, so a pipeline
asking AOTInductor to compile an ONNX model is refused before it is queued.

Backends write into a staging folder (published when the stage succeeds) and keep their caches
under ``<jobs folder>/cache`` (Inductor's, TensorRT's timing caches), inside the platform's
storage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import Field, ValidationError, model_validator

from pipelines.backends import (
    AUTO,
    AUTO_ORDER,
    BACKEND_INFO,
    CompiledModel,
    available_backends,
    cache_root_for,
    resolve_backend,
)
from pipelines.backends.aotinductor import compile_aotinductor
from pipelines.backends.tensorrt import (
    check_int8,
    compile_tensorrt,
    onnx_quantization,
    profile_shapes,
)
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
    CPU_PROVIDERS,
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

__all__ = [
    "BACKENDS",
    "Compile",
    "CompileFn",
    "CompileSettings",
    "CompiledModel",
    "choose_backend",
    "compile_onnxruntime",
    "onnxruntime_providers",
]

GraphOptimizationLevel = Literal["basic", "extended", "all"]


BackendName = Literal["auto", "onnxruntime", "aotinductor", "tensorrt"]
Device = Literal["auto", "cpu", "cuda"]
BatchBound = Annotated[int, Field(ge=1, le=65_536)]
DimRange = Annotated[
    list[Annotated[int, Field(ge=1, le=1_000_000)]], Field(min_length=3, max_length=3)
]

# Settings that only mean something to some backends; set to anything but their default with
# another backend, they are refused (a typo'd backend should not silently drop fp16).
_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "graph_optimization_level": ("onnxruntime", AUTO),
    "intra_op_threads": ("onnxruntime", AUTO),
    "providers": ("onnxruntime", AUTO),
    "device": ("aotinductor",),
    "dim_ranges": ("aotinductor", "tensorrt", AUTO),
    "fp16": ("tensorrt",),
    "int8": ("tensorrt",),
    "min_batch": ("tensorrt",),
    "opt_batch": ("tensorrt",),
    "max_batch": ("tensorrt",),
    "workspace_mb": ("tensorrt",),
    "version_compatible": ("tensorrt",),
    "hardware_compatible": ("tensorrt",),
}


class CompileSettings(StageSettings):
    """Settings of compile."""

    backend: BackendName = Field(
        default="auto",
        description=(
            "Runtime to compile for. auto: the best this worker has (tensorrt on a GPU with "
            "TensorRT, else onnxruntime); onnxruntime: a graph-optimised ONNX model (ONNX in); "
            "aotinductor: a .pt2 package compiled by torch's AOTInductor (TorchScript in); "
            "tensorrt: a TensorRT engine for this GPU model (ONNX in, GPU workers only)."
        ),
    )
    # "all" adds layout optimisations (NCHWc convolutions and the like) that are chosen for the
    # CPU doing the compiling; saved into the model, they only load on CPUs with the same
    # instruction set, so a version compiled on one worker could fail on a serving node.
    # "extended" (the fusions: Gemm+activation, attention, layer norm, ...) is portable.
    graph_optimization_level: GraphOptimizationLevel = Field(
        default="extended",
        description=(
            "onnxruntime: how far it optimises the graph. basic: constant folding and "
            "redundant-node removal; extended: also operator fusions; all: also CPU-layout "
            "optimisations, which tie the saved model to CPUs like the one that compiled it."
        ),
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="onnxruntime: threads inside one operator; 0: one per core.",
    )
    providers: Device = Field(
        default="auto",
        description=(
            "onnxruntime: execution provider the graph is optimised for. auto: CUDA where this "
            "worker's onnxruntime has the CUDA provider and a GPU, else CPU; cpu; cuda (refused "
            "where there is none). A CUDA-optimised graph may only load with the CUDA provider."
        ),
    )
    device: Device = Field(
        default="auto",
        description=(
            "aotinductor: device the package is compiled for. auto: cuda when this worker has a "
            "GPU, else cpu. A cuda package only runs on a GPU."
        ),
    )
    dim_ranges: dict[str, DimRange] = Field(
        default_factory=dict,
        description=(
            'Ranges of named dynamic dims other than the batch, [min, opt, max], e.g. {"seq": '
            "[1, 128, 512]}. tensorrt: required for each such dim (the optimisation profile); "
            "aotinductor: the dim's allowed range, opt being the example size (unlisted dims "
            "are dynamic from 1 up, example size 8)."
        ),
    )
    fp16: bool = Field(
        default=False,
        description="tensorrt: allow fp16 kernels (faster on tensor cores; outputs move ~1e-3).",
    )
    int8: bool = Field(
        default=False,
        description=(
            "tensorrt: build the model's explicit int8 quantization. Needs QuantizeLinear/"
            "DequantizeLinear nodes (quantize with mode int8_static first); refused otherwise."
        ),
    )
    min_batch: BatchBound = Field(
        default=1, description="tensorrt: smallest batch the engine takes."
    )
    opt_batch: BatchBound = Field(
        default=8, description="tensorrt: the batch size TensorRT tunes its kernels for."
    )
    max_batch: BatchBound = Field(
        default=32, description="tensorrt: largest batch the engine takes (more costs GPU memory)."
    )
    workspace_mb: int | None = Field(
        default=None,
        ge=16,
        le=1_048_576,
        description=(
            "tensorrt: scratch memory the builder may give a layer, in MiB; unset: TensorRT's "
            "default (the GPU's memory)."
        ),
    )
    version_compatible: bool = Field(
        default=False,
        description=(
            "tensorrt: build an engine later TensorRT 10 runtimes can load (it embeds a lean "
            "runtime; loaders must allow engine host code). A little slower."
        ),
    )
    hardware_compatible: bool = Field(
        default=False,
        description=(
            "tensorrt: build an engine for every GPU of compute capability 8.0 or newer "
            "(AMPERE_PLUS), not only this GPU model. A little slower."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> CompileSettings:
        problems: list[str] = []
        for name, backends in _ONLY_FOR.items():
            if self.backend in backends:
                continue
            default = type(self).model_fields[name].get_default(call_default_factory=True)
            if getattr(self, name) != default:
                owners = " or ".join(b for b in backends if b != AUTO)
                problems.append(f"{name} applies to backend {owners}, not {self.backend}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            problems.append(
                f"the batch sizes must satisfy min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )
        for dim, (low, opt, high) in self.dim_ranges.items():
            if not low <= opt <= high:
                problems.append(
                    f"dim_ranges[{dim!r}] must be [min, opt, max] with min <= opt <= max"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


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


def _max_abs_diff(reference: list[Any], other: list[Any]) -> float:
    diffs = [
        float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for a, b in zip(reference, other, strict=False)
        if np.asarray(a).size
    ]
    return max(diffs, default=0.0)


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
        from pipelines.backends import _cuda_reason

        reason = _cuda_reason()
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
        _session(source.path, options, providers)
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
        session = _session(out_path, check_options, providers)
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


class Compile:
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
        backend = getattr(settings, "backend", AUTO)
        if backend == AUTO:
            return tuple(dict.fromkeys(f for n in AUTO_ORDER for f in BACKEND_INFO[n].accepts))
        return BACKEND_INFO[backend].accepts

    @classmethod
    def produces_for(cls, settings: StageSettings) -> str | tuple[str, ...]:
        """The format compile leaves; for auto, each format it may leave (decided on the worker)."""
        backend = getattr(settings, "backend", AUTO)
        if backend == AUTO:
            made = [BACKEND_INFO[n].produces for n in reversed(AUTO_ORDER)]
            return tuple(dict.fromkeys(made))
        return BACKEND_INFO[backend].produces

    @classmethod
    def narrow_for(cls, settings: StageSettings, formats: tuple[str, ...]) -> StageSettings | None:
        """For "auto" followed by a stage that takes only some of its formats: the settings
        naming the one backend that makes them (None: no single one, or its settings refuse)."""
        if getattr(settings, "backend", AUTO) != AUTO:
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

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Compile the current artifact; the compiled model becomes the current one."""
        started = time.perf_counter()
        s = coerce_settings(CompileSettings, settings)
        source = ctx.current_artifact
        require_format(source, self.name, self.accepts_for(s))
        name, effective, note = choose_backend(source, s)
        require_format(source, f"{self.name} (backend {name})", BACKEND_INFO[name].accepts)
        backend = BACKENDS[name]

        stage_dir = ctx.stage_dir(stage_id)
        progress(0.0, note or f"compiling for {name}")
        with staging_area(stage_dir) as area:
            compiled = backend(
                source, area.dir, effective, progress, cache_root=cache_root_for(ctx.workdir)
            )
            area.main = compiled.filename
        final = stage_dir / compiled.filename
        if compiled.inputs is not None and compiled.outputs is not None:
            inputs, outputs = list(compiled.inputs), list(compiled.outputs)
        elif compiled.format == ModelFormat.ONNX.value:
            inputs, outputs = read_tensor_specs(final)
        else:
            inputs, outputs = list(source.inputs), list(source.outputs)
        metrics = {**compiled.metrics, "size_bytes": float(model_size_bytes(final))}
        meta = {**compiled.meta, "settings": settings_meta(s)}
        if note:
            meta["backend_choice"] = note
        artifact = Artifact(
            key=stage_id,
            path=str(final),
            format=compiled.format,
            precision=compiled.precision or source.precision,
            inputs=inputs,
            outputs=outputs,
            parent=source.key,
            backend=compiled.backend,
            produced_by=self.name,
            metrics=metrics,
            meta=meta,
        )
        ctx.add_artifact(artifact)
        progress(1.0, "compiled")
        nodes = ""
        if "nodes_before" in metrics:
            nodes = f": {metrics['nodes_before']:.0f} -> {metrics['nodes_after']:.0f} nodes"
        summary = f" ({compiled.summary})" if compiled.summary else ""
        message = f"compiled for {compiled.backend}{summary}{nodes}"
        if note:
            message += f"; {note}"
        return timed_result(
            stage_id,
            self.name,
            started,
            outputs=[artifact.key],
            metrics=compiled.metrics,
            message=message,
        )
