"""Cutting a dataset's rows into train, validation and test: a seeded permutation, so every
stage of every job sees the same rows."""

from __future__ import annotations

import math

import numpy as np

from pipelines.core import DatasetRef, PipelineError
from pipelines.datasets.columns import SPLITS


def split_fractions(ref: DatasetRef) -> tuple[dict[str, float], int]:
    splits = dict(ref.splits or {})
    try:
        seed = int(splits.get("seed", 0))
        fractions = {name: float(splits.get(name, 0.0)) for name in SPLITS[:3]}
    except (TypeError, ValueError):
        raise PipelineError(
            f"dataset {ref.id} has invalid splits {splits}: fractions and seed must be numbers"
        ) from None
    if any(not math.isfinite(v) or v < 0 for v in fractions.values()):
        raise PipelineError(f"dataset {ref.id} has a negative split fraction: {splits}")
    if sum(fractions.values()) <= 0:
        raise PipelineError(
            f"dataset {ref.id} has no non-zero split fraction (train, validation, test): {splits}"
        )
    return fractions, seed


def split_indices(rows: int, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of the train, validation and test splits (and "all", in file order).

    A permutation of ``range(rows)`` seeded by ``seed`` is cut by the fractions (normalised to
    sum to 1; largest remainders get the rounding), so every row is in exactly one split and the
    same dataset and seed always give the same cut. A split with a non-zero fraction gets at least
    one row whenever there are enough rows for all of them, taken from the largest split.
    """
    names = list(SPLITS[:3])
    weights = np.array([max(float(fractions.get(n, 0.0)), 0.0) for n in names])
    if weights.sum() <= 0:
        raise ValueError("no non-zero split fraction")
    exact = weights / weights.sum() * rows
    counts = np.floor(exact).astype(np.int64)
    order = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: rows - int(counts.sum())]:
        counts[i] += 1
    for i in range(len(names)):
        if weights[i] > 0 and counts[i] == 0:
            donor = int(np.argmax(counts))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    perm = np.random.default_rng(seed).permutation(rows)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    result = {name: perm[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
    result["all"] = np.arange(rows)
    return result
