"""Loading an artifact into the engine of its format's family."""

from __future__ import annotations

from pathlib import Path

from pipelines.core import Artifact, PipelineError
from pipelines.engines.base import (
    BaseEngine,
    EngineKind,
    EngineOptions,
    EngineUnavailable,
    engine_formats,
    engine_kind,
    resolve_device,
)
from pipelines.engines.tensor import TENSOR, Engine
from pipelines.onnx_io import first_error_line


def load_engine(
    artifact: Artifact,
    device: str = "auto",
    cache_root: Path | None = None,
    *,
    options: EngineOptions | None = None,
    family: str | None = TENSOR,
) -> Engine:
    """Load ``artifact`` to run on ``device`` ("auto", "cpu" or "cuda").

    TorchScript and ONNX run on the device asked for (ONNX on the CPU where onnxruntime has no
    CUDA provider: ``engine.device`` says); AOTInductor packages on the device they were compiled
    for; TensorRT engines on the GPU. ``cache_root`` is the platform's compile cache folder
    (AOTInductor packages extract their kernels under it; ``options.cache_root`` says the same).
    EngineUnavailable when it cannot run on this worker, PipelineError when the file is missing
    or does not load, or the model is not of ``family`` (None: any family; the caller then
    dispatches on ``engine.family``).
    """
    kind = kind_for(artifact)
    if not Path(artifact.path).exists():
        raise PipelineError(f"cannot load {artifact.key}: its file {artifact.path} is missing")
    options = options or EngineOptions()
    if cache_root is not None and options.cache_root is None:
        options = EngineOptions(options.threads, options.optimization, Path(cache_root))
    where = resolve_device(device)
    try:
        engine = kind.factory(artifact, where, options)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(
            f"cannot load {artifact.key} ({artifact.format}): {first_error_line(exc)}"
        ) from exc
    if family is not None:
        require_family(engine, family)
    return engine  # type: ignore[return-value]


def kind_for(artifact: Artifact) -> EngineKind:
    """How ``artifact``'s format is loaded; EngineUnavailable when no engine runs it."""
    kind = engine_kind(artifact.format)
    if kind is None:
        known = ", ".join(engine_formats())
        raise EngineUnavailable(f"no engine runs {artifact.format} models (engines run {known})")
    return kind


def require_family(engine: BaseEngine, family: str) -> BaseEngine:
    """``engine`` if it is of ``family``; else a PipelineError saying what it is."""
    if engine.family != family:
        raise PipelineError(
            f"{engine.key} is a {engine.family} model ({engine.format}); this step runs "
            f"{family} models"
        )
    return engine
