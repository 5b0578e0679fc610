"""Running a tensor engine over many rows: batched, padded where the engine needs it, cached.

Every caller that scores a model on data (task metrics, quantize's retention, compile's parity,
the challenger's score, the certification's golden runs) goes through :func:`run_rows` or
:func:`predict`, so there is one rule for batches: at most ``batch_size`` rows a call, clamped to
the engine's batch range; a last batch below the engine's smallest is padded with its last row
and the extra outputs dropped; an output that is not batch-first is an error.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core import Artifact, PipelineError
from pipelines.engines.base import EngineOptions
from pipelines.engines.feeds import cast_rows
from pipelines.engines.load import kind_for, load_engine
from pipelines.engines.tensor import Engine
from pipelines.onnx_io import describe_inputs

DEFAULT_BATCH = 64


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``size`` rows (for a fixed-batch engine)."""
    if len(array) >= size:
        return array
    return np.concatenate([array, np.repeat(array[-1:], size - len(array), axis=0)])


def batch_step(engine: Engine, batch_size: int | None = None) -> int:
    """Rows per call: ``batch_size`` (default: the engine's largest, or DEFAULT_BATCH) clamped
    to the engine's batch range."""
    low, high = engine.batch_range or (1, None)
    step = batch_size or (high if high is not None else DEFAULT_BATCH)
    if high is not None:
        step = min(step, high)
    return max(low, step)


def padded(engine: Engine, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``inputs`` padded up to the engine's smallest batch (its last row repeated)."""
    low = engine.batch_range[0] if engine.batch_range else 1
    return {name: pad_rows(np.asarray(array), low) for name, array in inputs.items()}


def run_rows(
    engine: Engine,
    inputs: Mapping[str, np.ndarray],
    batch_size: int | None = None,
    *,
    cast: bool = False,
    progress: Callable[[float], None] | None = None,
) -> dict[str, np.ndarray]:
    """Every output for every row of ``inputs`` (arrays keyed by input name, rows first).

    ``cast``: the rows come from a dataset, not a client: cast them to the inputs' dtypes
    whatever the values (a CSV's float64 columns for a float32 model). ``progress`` gets the
    fraction of rows done after each call; whatever it raises (Cancelled) stops the run.
    """
    if batch_size is not None and batch_size < 1:
        raise PipelineError(f"batch_size must be at least 1, got {batch_size}")
    names = {spec.name for spec in engine.inputs}
    if cast:
        arrays = cast_rows(engine.inputs, inputs)
    else:
        arrays = {k: np.asarray(v) for k, v in inputs.items() if k in names}
    missing = [spec.name for spec in engine.inputs if spec.name not in arrays]
    if missing:
        raise PipelineError(
            f"{engine.key!r} needs input(s) {missing}; the data has {sorted(inputs)}"
        )
    counts = {len(a) if a.ndim else -1 for a in arrays.values()}
    if len(counts) != 1 or -1 in counts:
        raise PipelineError(f"the inputs have different row counts: {describe_inputs(arrays)}")
    rows = counts.pop() if arrays else 0
    step = batch_step(engine, batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    with engine.context():
        for start in range(0, rows, step):
            chunk = padded(engine, {n: a[start : start + step] for n, a in arrays.items()})
            real = min(step, rows - start)
            size = len(next(iter(chunk.values())))
            for name, value in engine.run(chunk).items():
                if value.ndim == 0 or value.shape[0] != size:
                    raise PipelineError(
                        f"{engine.key!r} returned output {name!r} of shape {list(value.shape)} "
                        f"for a batch of {size}: it is not batch-first"
                    )
                parts.setdefault(name, []).append(value[:real])
            if progress is not None:
                progress(min(start + real, rows) / rows)
    return {name: np.concatenate(values) for name, values in parts.items()}


def first_output(engine: Engine, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The engine's first output (by its declared order) out of ``run_rows``'s result."""
    if not outputs:
        return np.empty((0,), dtype=np.float32)
    for name in engine.output_names:
        if name in outputs:
            return outputs[name]
    return next(iter(outputs.values()))


# -- loaded engines, kept per file -----------------------------------------------------------------

_CACHE_SIZE = 4
_cache: OrderedDict[tuple[Any, ...], Engine] = OrderedDict()
_cache_lock = threading.Lock()


def clear_engine_cache() -> None:
    """Forget the engines open_engine loaded (they are loaded again on next use)."""
    with _cache_lock:
        _cache.clear()


def open_engine(
    artifact: Artifact, device: str = "auto", options: EngineOptions | None = None
) -> Engine:
    """``load_engine``, but a file already loaded in this process (same path, mtime, size,
    declared inputs) is reused: a stage that rewrites a file gets a fresh engine."""
    kind_for(artifact)  # a format no engine runs is refused as such, before its file is looked at
    path = Path(artifact.path)
    try:
        st = path.stat()
    except OSError:
        raise PipelineError(f"cannot run {artifact.key!r}: its file {path} is missing") from None
    options = options or EngineOptions()
    key: tuple[Any, ...] = (
        artifact.format,
        os.path.realpath(path),
        st.st_mtime_ns,
        st.st_size,
        tuple((s.name, tuple(s.shape), s.dtype) for s in artifact.inputs),
        device,
        options,
    )
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            cached.key = artifact.key
            return cached
    engine = load_engine(artifact, device, options=options)
    with _cache_lock:
        _cache[key] = engine
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return engine


def predict(
    artifact: Artifact,
    inputs: Mapping[str, np.ndarray],
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[float], None] | None = None,
    device: str = "auto",
) -> np.ndarray:
    """The model's first output for every row of a dataset's ``inputs``, in batches.

    The engine is loaded once per file in the process (:func:`open_engine`); the rows are cast
    to the model's input dtypes.
    """
    engine = open_engine(artifact, device)
    outputs = run_rows(engine, inputs, batch_size, cast=True, progress=progress)
    return first_output(engine, outputs)
