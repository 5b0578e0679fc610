"""Inspecting an uploaded dataset without executing anything from it.

:func:`inspect_dataset` runs in the web process on an upload: the format is decided by the
content (the name only words refusals), and anything it cannot read is refused with a
:class:`~pipelines.formats.RejectedUpload` saying what to upload instead. A JSON Lines file whose
first row holds text (:func:`pipelines.datasets.text_rows.is_text_row`) is a text dataset for
language models, checked by :mod:`pipelines.datasets.text_rows`; one whose first row is a tensor
model's test case (:func:`~pipelines.datasets.text_rows.is_tensor_case_row`) is a test-case
dataset, checked by :mod:`pipelines.datasets.tensor_cases`; any other is rows of numbers.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from pipelines.datasets.columns import (
    MAX_DATASET_BYTES,
    Column,
    DatasetInfo,
    default_target,
    refuse,
)
from pipelines.datasets.npz import inspect_npz
from pipelines.datasets.tensor_cases import inspect_test_cases
from pipelines.datasets.text import inspect_csv, read_jsonl
from pipelines.datasets.text_rows import (
    first_row,
    inspect_text_jsonl,
    is_tensor_case_row,
    is_text_row,
)

_OTHER_FORMATS = (
    (b"\x93NUMPY", "a single NumPy array (.npy); save the arrays with numpy.savez as an .npz"),
    (b"PAR1", "a Parquet file; convert it to CSV or npz"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file; convert it to npz"),
    (b"\x1f\x8b", "a gzip file; upload it uncompressed"),
)


def inspect_dataset(
    path: Path, original_name: str, max_bytes: int = MAX_DATASET_BYTES
) -> DatasetInfo:
    """Identify and validate the dataset file at ``path`` without executing anything from it.

    ``original_name`` is the name the user gave (its extension only words refusals);
    ``max_bytes`` bounds the file and an npz's unpacked size. Raises RejectedUpload.
    """
    path = Path(path)
    ext = Path(str(original_name or "")).suffix.lower()
    try:
        st = path.stat()
    except OSError as exc:
        raise refuse(f"the upload cannot be read ({exc.strerror})", "unreadable") from None
    if not stat.S_ISREG(st.st_mode):
        raise refuse("the upload is not a regular file", "unreadable")
    size = st.st_size
    if size == 0:
        raise refuse("the file is empty", "empty")
    if size > max_bytes:
        raise refuse(f"the file is {size} bytes, over the {max_bytes}-byte limit", "too_large")
    with path.open("rb") as f:
        head = f.read(64)

    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        columns, rows, details = inspect_npz(path, max_bytes)
        arrays = [{"name": c.name, "dtype": c.dtype, "shape": [rows, *c.shape]} for c in columns]
        return _info("npz", rows, {"arrays": arrays}, columns, {"bytes": size, **details})
    if ext == ".npz":
        raise refuse(
            "not an npz file: an .npz must be the zip archive numpy.savez writes", "invalid_npz"
        )
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise refuse(f"unsupported dataset format ({what})", "unrecognised")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise refuse(
            "pickle files are refused: loading one runs arbitrary code. Upload CSV, JSON Lines "
            "or npz",
            "pickle",
        )
    if b"\x00" in head:
        raise refuse(
            "unrecognised dataset format (binary data); upload CSV, JSON Lines or npz",
            "unrecognised",
        )

    first = _first_text_char(path)
    row = first_row(path) if first == "{" else None
    if is_tensor_case_row(row):
        # A tensor model's test cases: one suite for the certification, no columns, no target.
        rows, cases = inspect_test_cases(path, max_bytes)
        details = {"bytes": size, "default_target": None}
        return DatasetInfo("jsonl", rows, {"test_cases": cases}, details)
    if is_text_row(row):
        # Strings for a language model (text_corpus), not numbers: no columns, no target.
        _, rows, schema = inspect_text_jsonl(path)
        return DatasetInfo("jsonl", rows, schema, {"bytes": size, "default_target": None})
    if first == "{":
        columns, rows = read_jsonl(path, keep_values=False)[:2]
        schema_columns: list[dict[str, Any]] = []
        for c in columns:
            entry: dict[str, Any] = {"name": c.name, "dtype": c.dtype}
            if c.shape:
                entry["shape"] = list(c.shape)
            schema_columns.append(entry)
        return _info("jsonl", rows, {"columns": schema_columns}, columns, {"bytes": size})
    if first == "[":
        raise refuse(
            "this is a JSON array; write one JSON object per line (JSON Lines), e.g. "
            '{"x": [0.1, 0.2], "label": 1}',
            "invalid_jsonl",
        )
    if ext in (".jsonl", ".ndjson", ".json"):
        raise refuse(
            "not JSON Lines: each line must be a JSON object starting with '{'", "invalid_jsonl"
        )
    columns, rows = inspect_csv(path)
    schema = {"columns": [{"name": c.name, "dtype": c.dtype} for c in columns]}
    return _info("csv", rows, schema, columns, {"bytes": size, "delimiter": ","})


def _info(
    fmt: str, rows: int, schema: dict[str, Any], columns: list[Column], details: dict[str, Any]
) -> DatasetInfo:
    names = [c.name for c in columns]
    target = default_target(names)
    details = {**details, "default_target": target}
    return DatasetInfo(format=fmt, rows=rows, schema=schema, details=details)


def _first_text_char(path: Path) -> str:
    """The first non-whitespace character of a UTF-8 text file (a RejectedUpload if not text).

    Only the head up to its first invalid byte has to decode: a bad byte further on is left to
    the line reader, whose refusal names the line.
    """
    with path.open("rb") as f:
        raw = f.read(4096)
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark
    try:
        text, valid = raw.decode("utf-8"), True
    except UnicodeDecodeError as exc:  # also a head that ends inside a multi-byte character
        text, valid = raw[: exc.start].decode("utf-8"), False
    stripped = text.lstrip()
    if stripped or valid:
        return stripped[:1]
    raise refuse(
        "unrecognised dataset format (not UTF-8 text); upload CSV, JSON Lines or npz",
        "unrecognised",
    )
