"""What every part of the datasets package shares: formats, limits, columns and results.

A dataset is columns (CSV, JSON Lines) or arrays (npz) that share their rows. :class:`Column` is
one of them as the inspection reads it and the stored schema records it; :class:`DatasetInfo` is
what an upload's inspection returns and :class:`SplitData` what a worker's loading returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.formats.errors import RejectedUpload

DATASET_FORMATS = ("csv", "jsonl", "npz")
SPLITS = ("train", "validation", "test", "all")
# Column names taken as the target when the dataset names none, in this order.
TARGET_NAMES = ("label", "target", "y")

# A one-input model reads a column/array of this name when none is named after the input.
FEATURES_NAME = "features"
MAX_DATASET_BYTES = 4 * 2**30  # the file, and an npz's unpacked members
MAX_COLUMNS = 100_000
MAX_RANK = 8  # dims of one value (JSON Lines nesting, npz array rank after the rows)


def default_target(names: Iterable[str]) -> str | None:
    """The column taken as the target when the dataset names none (TARGET_NAMES, in order)."""
    present = set(names)
    return next((n for n in TARGET_NAMES if n in present), None)



@dataclass
class DatasetInfo:
    """What :func:`inspect_dataset` learned about a dataset file.

    ``schema`` is ``{"columns": [{"name", "dtype"}]}`` for CSV and JSON Lines (list columns also
    have ``"shape"``, the shape of one row's value) and ``{"arrays": [{"name", "dtype", "shape"}]}``
    for npz (the full shape, rows first). It is stored with the dataset and becomes
    ``DatasetRef.schema``. ``details`` holds extra facts (bytes, the target a job would use).
    """

    format: str
    rows: int
    schema: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe data."""
        return asdict(self)


@dataclass
class SplitData:
    """The rows of one split, mapped onto a model: arrays keyed by input name, rows first."""

    inputs: dict[str, np.ndarray]
    targets: np.ndarray | None
    rows: int


@dataclass(frozen=True)
class Column:
    """A column (CSV, JSON Lines) or array (npz): name, dtype and the shape of one row's value."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def refuse(message: str, code: str) -> RejectedUpload:
    """The refusal of an upload; ``code`` is its stable tag ("invalid_csv", "zip_bomb", ...)."""
    return RejectedUpload(message, code=code)


def shorten(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters for a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
