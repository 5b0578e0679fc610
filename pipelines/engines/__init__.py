"""The one way to load and run a model: every stage, the certification suite and serving use it.

:func:`load_engine` turns an :class:`~pipelines.core.Artifact` into an engine of its format's
family. Today's family is ``tensor`` (:mod:`.tensor`: ONNX, TorchScript, AOTInductor, TensorRT;
named arrays in, named arrays out). A text-generation family (prefill + decode with a KV cache,
streaming tokens) registers its formats with :func:`.base.register_engine` under its own family
name; callers that need a family ask for it with :func:`require_family`, never by format.

* Rows of a dataset: :func:`run_rows` (every output, batched and padded for the engine) and
  :func:`predict` (the first output; the engine cached per file in the process).
* One request or one timing loop: ``Engine.run`` and ``Engine.prepare`` (feeds checked by
  :mod:`.feeds`; nothing is converted that would lose a value).

Engines that cannot run on this worker raise :class:`EngineUnavailable` with the reason. torch,
onnxruntime and tensorrt are imported when an engine is loaded, never when this package is.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core import Artifact, PipelineError
from pipelines.engines.base import (
    BaseEngine,
    EngineOptions,
    EngineUnavailable,
    cuda_available,
    engine_formats,
    engine_kind,
    register_engine,
    resolve_device,
)
from pipelines.engines.feeds import EngineInputError
from pipelines.engines.rows import (
    batch_step,
    clear_engine_cache,
    first_output,
    open_engine,
    padded,
    predict,
    run_rows,
)
from pipelines.engines.tensor import TENSOR, Engine, input_specs
from pipelines.onnx_io import first_error_line

__all__ = [
    "ENGINE_FORMATS",
    "TENSOR",
    "BaseEngine",
    "Engine",
    "EngineInputError",
    "EngineOptions",
    "EngineUnavailable",
    "batch_step",
    "clear_engine_cache",
    "cuda_available",
    "engine_formats",
    "first_output",
    "input_specs",
    "load_engine",
    "open_engine",
    "padded",
    "predict",
    "register_engine",
    "require_family",
    "resolve_device",
    "run_rows",
]

# The formats of the tensor family (what certification and serving load today).
ENGINE_FORMATS: tuple[str, ...] = engine_formats(TENSOR)


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
    kind = engine_kind(artifact.format)
    if kind is None:
        known = ", ".join(engine_formats())
        raise EngineUnavailable(f"no engine runs {artifact.format} models (engines run {known})")
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


def require_family(engine: BaseEngine, family: str) -> BaseEngine:
    """``engine`` if it is of ``family``; else a PipelineError saying what it is."""
    if engine.family != family:
        raise PipelineError(
            f"{engine.key} is a {engine.family} model ({engine.format}); this step runs "
            f"{family} models"
        )
    return engine
