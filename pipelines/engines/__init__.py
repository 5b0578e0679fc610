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

from pipelines.engines.base import (
    BaseEngine,
    EngineOptions,
    EngineUnavailable,
    cuda_available,
    engine_formats,
    register_engine,
    resolve_device,
)
from pipelines.engines.feeds import EngineInputError
from pipelines.engines.load import load_engine, require_family
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
