"""The numbers the suite judges parity and determinism on: tolerances, errors, histograms.

Parity of a float engine with its FP32 reference is judged per output on the normalised error
``e = |a - b| / (atol + rtol * |b|)`` (``a`` the engine, ``b`` the reference): a statistic of ``e``
over the output's elements must be at most 1. ``elementwise`` (the worst element) is the
``numpy.allclose`` rule; ``p99`` lets the 1 % of elements that half precision rounds worst go,
which is where fp16/bf16 kernels differ from fp32 without being wrong.

Errors are computed in float64. Positions where both values are NaN (or the same inf) count as
equal; a NaN or inf on one side only is an infinite error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipelines.core import Precision

__all__ = [
    "DEFAULT_TOLERANCES",
    "HISTOGRAM_BINS",
    "Tolerance",
    "abs_error",
    "error_histogram",
    "max_rel_error",
    "normalised_statistic",
    "row_cosine",
    "tolerance_for",
]

HISTOGRAM_BINS = 20
# Relative errors divide by |reference|, floored here so an exact zero does not divide by zero.
REL_FLOOR = 1e-12


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    statistic: str  # "elementwise" | "mean" | "p99"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# By the engine's precision; INT8 is judged by task-metric retention instead.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    Precision.FP32.value: Tolerance(atol=1e-4, rtol=1e-3, statistic="elementwise"),
    Precision.FP16.value: Tolerance(atol=1e-2, rtol=1e-2, statistic="p99"),
    Precision.BF16.value: Tolerance(atol=5e-2, rtol=5e-2, statistic="p99"),
}


def tolerance_for(precision: str, output: str, overrides: Mapping[str, Any]) -> Tolerance:
    """The precision's default, then the ``"*"`` override, then the output's own, field by field.

    ``overrides`` maps an output name (or "*") to an object with optional ``atol``, ``rtol`` and
    ``statistic`` (CertifySettings' OutputTolerance); an unknown precision takes FP32's.
    """
    base = DEFAULT_TOLERANCES.get(precision, DEFAULT_TOLERANCES[Precision.FP32.value])
    values = base.to_dict()
    for key in ("*", output):
        override = overrides.get(key)
        if override is None:
            continue
        for field in ("atol", "rtol", "statistic"):
            value = getattr(override, field, None)
            if value is not None:
                values[field] = value
    return Tolerance(float(values["atol"]), float(values["rtol"]), str(values["statistic"]))


def abs_error(got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """``|got - expected|`` in float64; equal non-finite values 0, a lone NaN or inf inf."""
    a = np.asarray(got, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {list(a.shape)} differs from the reference's {list(b.shape)}")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    return np.where(np.isnan(diff), np.inf, diff)


def max_rel_error(diff: np.ndarray, expected: np.ndarray) -> float:
    """The largest ``|a - b| / |b|`` (|b| floored at REL_FLOOR); recorded, not judged."""
    if diff.size == 0:
        return 0.0
    scale = np.maximum(np.abs(np.asarray(expected, dtype=np.float64)), REL_FLOOR)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = diff / np.where(np.isfinite(scale), scale, np.inf)
    return float(np.nan_to_num(rel, nan=np.inf).max())


def normalised_statistic(diff: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> float:
    """The tolerance's statistic of ``diff / (atol + rtol*|b|)``; pass when it is <= 1.

    With atol and rtol both 0, an exact match is 0 and any difference is inf.
    """
    if diff.size == 0:
        return 0.0
    scale = tolerance.atol + tolerance.rtol * np.abs(np.asarray(expected, dtype=np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(diff == 0, 0.0, diff / scale)
    e = np.nan_to_num(e, nan=np.inf, posinf=np.inf)
    if tolerance.statistic == "mean":
        return float(e.mean())
    if tolerance.statistic == "p99":
        # "higher": an element's actual error, not an interpolation towards the next one.
        return float(np.percentile(e, 99, method="higher"))
    return float(e.max())


def error_histogram(diff: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of the absolute errors in log-spaced bins, for the report's chart.

    ``edges`` (bins + 1) run from the smallest non-zero error to the largest; exact zeros and
    infinite errors have no place on a log axis and are counted apart (``zeros``, ``nonfinite``).
    """
    flat = np.asarray(diff, dtype=np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    positive = finite[finite > 0]
    result: dict[str, Any] = {
        "edges": [],
        "counts": [],
        "zeros": int(np.count_nonzero(finite == 0)),
        "nonfinite": int(flat.size - finite.size),
    }
    if positive.size:
        low, high = float(positive.min()), float(positive.max())
        if high <= low:
            high = low * 10.0
        edges = np.geomspace(low, high, bins + 1)
        counts, _ = np.histogram(positive, bins=edges)
        result["edges"] = [float(e) for e in edges]
        result["counts"] = [int(c) for c in counts]
    return result


def row_cosine(got: np.ndarray, expected: np.ndarray) -> float:
    """Mean cosine similarity of matching rows (rows first); two all-zero rows count as 1."""
    a = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    b = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    if a.shape != b.shape:
        raise ValueError(f"shape {list(a.shape)} differs from the reference's {list(b.shape)}")
    if len(a) == 0:
        return 1.0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(both_zero, 1.0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-300))
    return float(np.nan_to_num(cos, nan=0.0).mean())
