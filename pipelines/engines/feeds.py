"""Checking feeds against a tensor engine's inputs, and casting dataset rows to them.

:func:`check_feeds` is what every call of a tensor engine goes through: names, rank, fixed dims,
one size per named dynamic dim, the batch range, and dtypes converted only when every value is
kept. :func:`cast_rows` is the lossy cast for rows read from a dataset (CSV columns parse to
float64; a model may take float32 or int64 token ids), used only where the platform, not a
client, made the arrays.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.core import PipelineError, TensorSpec


class EngineInputError(PipelineError):
    """A feed that does not fit the engine's inputs; nothing was run."""


def _shape_text(spec: TensorSpec) -> str:
    return "[" + ", ".join(str(d) for d in spec.shape) + "]"


def conform_dtype(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """``array`` in the input's dtype when that keeps every value; else EngineInputError."""
    try:
        wanted = np.dtype(spec.dtype)
    except TypeError:  # a dtype numpy cannot name (bfloat16): the runtime judges the feed
        return array
    given = array.dtype
    if given == wanted:
        return array
    refused = EngineInputError(
        f"input {spec.name!r} is {given} but the model takes {wanted}; int, float and bool "
        f"feeds are not converted into one another: send {wanted}"
    )
    if given.kind == "f" and wanted.kind == "f":
        with np.errstate(over="ignore"):
            cast = array.astype(wanted)
        if np.array_equal(np.isfinite(array), np.isfinite(cast)):
            return cast
        raise EngineInputError(
            f"input {spec.name!r} has {given} values beyond the range of {wanted} (they would "
            "become inf); send values the model's dtype can hold"
        )
    if given.kind in "iu" and wanted.kind in "iu":
        if array.size == 0 or np.can_cast(given, wanted, "safe"):
            return array.astype(wanted)
        info = np.iinfo(wanted)
        low, high = int(array.min()), int(array.max())
        if info.min <= low and high <= info.max:
            return array.astype(wanted)
        raise EngineInputError(
            f"input {spec.name!r} has values {low}..{high}, outside the {wanted} it takes"
        )
    raise refused


def check_feeds(
    specs: list[TensorSpec],
    feeds: Mapping[str, Any],
    batch_range: tuple[int, int] | None,
) -> dict[str, np.ndarray]:
    """``feeds`` as contiguous arrays in the inputs' order and dtypes, or EngineInputError."""
    names = [s.name for s in specs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if unknown:
            parts.append(f"unknown input(s) {unknown}")
        raise EngineInputError(f"{' and '.join(parts)}; the model takes {names}")
    arrays = {spec.name: np.asarray(feeds[spec.name]) for spec in specs}
    for spec in specs:
        array = arrays[spec.name]
        if array.ndim != len(spec.shape):
            raise EngineInputError(
                f"input {spec.name!r} has rank {array.ndim} (shape {list(array.shape)}) but the "
                f"model takes rank {len(spec.shape)}: {_shape_text(spec)}"
            )
    batched = [a for a in arrays.values() if a.ndim]
    if batch_range is not None and batched:
        batch, (low, high) = batched[0].shape[0], batch_range
        if not low <= batch <= high:
            span = f"batch size {low}" if low == high else f"batch sizes {low}..{high}"
            raise EngineInputError(f"a batch of {batch} is outside what this engine takes ({span})")
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        array = arrays[spec.name]
        for axis, (dim, size) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise EngineInputError(
                        f"dim {axis} of input {spec.name!r} is {size} but the model fixes it at "
                        f"{dim}: {_shape_text(spec)}"
                    )
                continue
            first = seen.setdefault(dim, (size, spec.name))
            if first[0] != size:
                raise EngineInputError(
                    f"dim {dim!r} is {first[0]} in input {first[1]!r} but {size} in "
                    f"{spec.name!r}; one name is one size"
                )
        arrays[spec.name] = np.ascontiguousarray(conform_dtype(spec, array))
    return arrays


def cast_rows(specs: list[TensorSpec], arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``arrays`` cast to the inputs' dtypes whatever the values (dataset rows, not requests)."""
    with contextlib.suppress(ImportError):  # registers bfloat16 with numpy, so a cast can name it
        import ml_dtypes  # noqa: F401
    cast: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            continue
        array = np.asarray(arrays[spec.name])
        try:
            wanted = np.dtype(spec.dtype)
        except TypeError:  # bfloat16 and the like: the runtime judges the feed
            wanted = array.dtype
        cast[spec.name] = np.ascontiguousarray(array.astype(wanted, copy=False))
    return cast
