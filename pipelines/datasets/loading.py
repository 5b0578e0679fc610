"""Loading a split of a dataset in a worker: its rows, mapped onto a model's inputs, in batches."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.datasets.columns import MAX_DATASET_BYTES, SPLITS, Column, SplitData
from pipelines.datasets.mapping import check_format, check_not_test_cases, plan_inputs
from pipelines.datasets.npz import inspect_npz
from pipelines.datasets.splits import split_fractions, split_indices
from pipelines.datasets.text import bounded_lines, read_jsonl
from pipelines.formats.errors import RejectedUpload
from pipelines.onnx_io import numpy_dtype


def _load_csv(path: Path) -> tuple[list[Column], dict[str, np.ndarray]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(bounded_lines(f, "CSV file"))
        header = next((r for r in reader if r and any(c.strip() for c in r)), None)
    if header is None:
        raise PipelineError("the CSV file has no lines")
    names = [c.strip() for c in header]
    try:
        data = np.loadtxt(
            path,
            delimiter=",",
            skiprows=1,
            ndmin=2,
            dtype=np.float64,
            quotechar='"',
            comments=None,
            encoding="utf-8-sig",
        )
    except ValueError as exc:
        raise PipelineError(f"the CSV file cannot be read as numbers: {exc}") from None
    if data.shape[1] != len(names):
        raise PipelineError(
            f"the CSV rows have {data.shape[1]} values but the header has {len(names)} columns"
        )
    columns: list[Column] = []
    values: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        column = data[:, i]
        whole = bool(np.all(np.isfinite(column)) and np.all(column == np.round(column)))
        columns.append(Column(name, "int64" if whole else "float64"))
        values[name] = column.astype(np.int64) if whole else column
    return columns, values


def _load_jsonl(path: Path) -> tuple[list[Column], dict[str, np.ndarray]]:
    try:
        columns, _, raw = read_jsonl(path, keep_values=True)
    except RejectedUpload as exc:
        raise PipelineError(f"the JSON Lines file cannot be read: {exc.message}") from None
    values = {c.name: np.asarray(raw[c.name], dtype=np.dtype(c.dtype)) for c in columns}
    return columns, values


def _load_npz(path: Path) -> tuple[list[Column], dict[str, np.ndarray]]:
    try:
        columns, _, _ = inspect_npz(path, MAX_DATASET_BYTES)
    except RejectedUpload as exc:
        raise PipelineError(f"the npz file cannot be read: {exc.message}") from None
    values: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as npz:
        for c in columns:
            values[c.name] = np.asarray(npz[c.name])
    return columns, values


_LOADERS = {"csv": _load_csv, "jsonl": _load_jsonl, "npz": _load_npz}


def _cast(array: np.ndarray, spec: TensorSpec, ref: DatasetRef) -> np.ndarray:
    dtype = numpy_dtype(spec.dtype)
    if dtype.kind in "iub" and array.dtype.kind == "f" and not np.all(array == np.round(array)):
        raise PipelineError(
            f"model input {spec.name!r} takes {dtype} but dataset {ref.id} holds fractional "
            "values for it"
        )
    return np.ascontiguousarray(array.astype(dtype, copy=False))


def load_split(ref: DatasetRef, split: str, input_specs: list[TensorSpec]) -> SplitData:
    """The rows of ``split`` of the dataset, mapped onto a model's inputs (see the module doc).

    ``split`` is "train", "validation", "test" (cut by ``ref.splits``) or "all" (file order).
    Targets keep the target column's values (int64 for integer columns); None without a target.
    """
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    check_format(ref)
    check_not_test_cases(ref)
    fractions, seed = split_fractions(ref)
    path = Path(ref.path)
    if not path.is_file():
        raise PipelineError(f"dataset {ref.id}: its file is missing on this worker ({path})")
    columns, values = _LOADERS[ref.format](path)
    plan = plan_inputs(ref, columns, input_specs)
    total = len(next(iter(values.values())))
    index = split_indices(total, fractions, seed)[split]
    rows = len(index)
    if rows == 0:
        # A dataset too small for its split fractions: say so instead of failing in a reshape.
        raise PipelineError(
            f"dataset {ref.id}: its {split} split is empty ({total} rows, fractions "
            f"{fractions}); upload more rows or give the {split} split a larger share"
        )

    inputs: dict[str, np.ndarray] = {}
    for item in plan.inputs:
        parts = [values[name][index].reshape(rows, -1) for name in item.sources]
        flat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        inputs[item.spec.name] = _cast(flat.reshape(rows, *item.row_shape), item.spec, ref)
    targets = None if plan.target is None else np.ascontiguousarray(values[plan.target][index])
    return SplitData(inputs=inputs, targets=targets, rows=rows)


def iter_batches(
    data: SplitData, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """``(inputs, targets)`` batches of at most ``batch_size`` rows; shuffled with ``seed``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = np.random.default_rng(seed).permutation(data.rows) if shuffle else None
    for start in range(0, data.rows, batch_size):
        if order is None:
            sel: slice | np.ndarray = slice(start, start + batch_size)
        else:
            sel = order[start : start + batch_size]
        batch = {name: array[sel] for name, array in data.inputs.items()}
        yield batch, None if data.targets is None else data.targets[sel]
