"""CSV and JSON Lines, read line by line with every line bounded: checked on upload, loaded later.

:func:`inspect_csv` and :func:`read_jsonl` refuse (RejectedUpload) anything that is not rows of
finite numbers under one header (CSV) or one set of keys (JSON Lines); a line longer than
:data:`MAX_LINE_CHARS` is refused before it is read whole.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pipelines.datasets.columns import MAX_COLUMNS, MAX_RANK, Column, refuse, shorten

MAX_LINE_CHARS = 16 * 2**20  # one CSV or JSON Lines line (a 3x224x224 image as text is ~2 MB)
_INT_LITERAL = re.compile(r"^\s*[+-]?\d+\s*$")


def bounded_lines(f: TextIO, what: str) -> Iterator[str]:
    """The lines of ``f``, refusing one longer than MAX_LINE_CHARS before reading all of it."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError:
            raise refuse(
                f"the {what} is not UTF-8 text (after line {lineno})", "unrecognised"
            ) from None
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise refuse(
                f"line {lineno} of the {what} is longer than {MAX_LINE_CHARS} characters",
                "line_too_long",
            )
        yield line


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def inspect_csv(path: Path) -> tuple[list[Column], int]:
    """Check a CSV file; its columns (int64 where every value is an integer) and data row count."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(bounded_lines(f, "CSV file"), strict=True)
        header: list[str] | None = None
        integral: list[bool] = []
        rows = 0
        try:
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if header is None:
                    header = _csv_header(record)
                    integral = [True] * len(header)
                    continue
                rows += 1
                line = reader.line_num
                if len(record) != len(header):
                    raise refuse(
                        f"line {line} has {len(record)} values but the header has "
                        f"{len(header)} columns; every row needs one value per column",
                        "invalid_csv",
                    )
                for i, cell in enumerate(record):
                    value = cell.strip()
                    if not value:
                        raise refuse(
                            f"line {line}, column {header[i]!r} is empty: missing values are "
                            "not supported; fill or drop them",
                            "invalid_csv",
                        )
                    if integral[i] and _INT_LITERAL.match(value):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        raise refuse(
                            f"column {header[i]!r} holds text ({shorten(value)!r} on line "
                            f"{line}): CSV datasets must be all numbers; encode class labels as "
                            "integers 0..C-1",
                            "invalid_csv",
                        ) from None
                    if not math.isfinite(number):
                        raise refuse(
                            f"line {line}, column {header[i]!r} is {value!r}: only finite "
                            "numbers are supported",
                            "invalid_csv",
                        )
                    integral[i] = False
        except csv.Error as exc:
            raise refuse(
                f"the CSV cannot be parsed at line {reader.line_num}: {exc}", "invalid_csv"
            ) from None
    if header is None:
        raise refuse("the file has no lines", "empty")
    if rows == 0:
        raise refuse("the CSV has a header but no data rows", "empty")
    columns = [
        Column(name, "int64" if whole else "float64")
        for name, whole in zip(header, integral, strict=True)
    ]
    return columns, rows


def _csv_header(record: list[str]) -> list[str]:
    names = [cell.strip() for cell in record]
    if len(names) > MAX_COLUMNS:
        raise refuse(f"the CSV has more than {MAX_COLUMNS} columns", "invalid_csv")
    if all(_is_number(n) for n in names):
        raise refuse(
            "the first line must be a header row naming the columns (it holds only numbers), "
            "e.g. p0,p1,...,label",
            "invalid_csv",
        )
    for i, name in enumerate(names):
        if not name:
            raise refuse(f"column {i + 1} of the header has no name", "invalid_csv")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise refuse(f"the header names column(s) {dupes} more than once", "invalid_csv")
    return names


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def value_shape(value: Any, depth: int = 0) -> tuple[tuple[int, ...], bool]:
    """The shape of a number or nested list of numbers, and whether every number is an int.

    Raises ValueError (with a short reason) for anything else: ragged lists, strings, bools, null.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{json.dumps(value)} is not a number")
    if isinstance(value, int):
        return (), True
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("only finite numbers are supported")
        return (), False
    if isinstance(value, list):
        if depth >= MAX_RANK:
            raise ValueError(f"lists are nested more than {MAX_RANK} deep")
        if not value:
            raise ValueError("an empty list")
        shapes = [value_shape(item, depth + 1) for item in value]
        first = shapes[0][0]
        if any(s != first for s, _ in shapes):
            raise ValueError("a ragged list (its items have different lengths)")
        return (len(value), *first), all(whole for _, whole in shapes)
    if isinstance(value, str):
        raise ValueError(f"text ({shorten(value)!r}); encode class labels as integers 0..C-1")
    raise ValueError(f"a {type(value).__name__}, not a number or a list of numbers")


def read_jsonl(path: Path, keep_values: bool) -> tuple[list[Column], int, dict[str, list[Any]]]:
    """Check a JSON Lines file; its columns, row count and (if ``keep_values``) values by key."""
    keys: list[str] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    integral: dict[str, bool] = {}
    values: dict[str, list[Any]] = {}
    rows = 0
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(bounded_lines(f, "JSON Lines file"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_json_constant)
            except (ValueError, RecursionError) as exc:
                raise refuse(
                    f"line {lineno} is not valid JSON: {shorten(str(exc), 120)}", "invalid_jsonl"
                ) from None
            if not isinstance(obj, dict):
                raise refuse(
                    f"line {lineno} is a JSON {type(obj).__name__}, not an object; write one "
                    'object per line, e.g. {"x": [0.1, 0.2], "label": 1}',
                    "invalid_jsonl",
                )
            if keys is None:
                if not obj:
                    raise refuse(f"line {lineno} is an empty object", "invalid_jsonl")
                if len(obj) > MAX_COLUMNS:
                    raise refuse(f"line {lineno} has more than {MAX_COLUMNS} keys", "invalid_jsonl")
                keys = list(obj)
                values = {k: [] for k in keys}
            elif len(obj) != len(keys) or set(obj) != set(keys):
                missing = sorted(set(keys) - set(obj))
                extra = sorted(set(obj) - set(keys))
                parts = []
                if missing:
                    parts.append(f"lacks {missing}")
                if extra:
                    parts.append(f"adds {extra}")
                raise refuse(
                    f"line {lineno} {' and '.join(parts)}: every line must have the same keys "
                    f"as the first ({shorten(', '.join(keys), 120)})",
                    "invalid_jsonl",
                )
            for key in keys:
                try:
                    shape, whole = value_shape(obj[key])
                except (ValueError, RecursionError) as exc:
                    raise refuse(
                        f"line {lineno}, key {key!r}: {exc}; values must be numbers or nested "
                        "lists of numbers",
                        "invalid_jsonl",
                    ) from None
                if key not in shapes:
                    shapes[key] = shape
                    integral[key] = whole
                elif shapes[key] != shape:
                    raise refuse(
                        f"line {lineno}, key {key!r} has shape {list(shape)} but earlier lines "
                        f"have {list(shapes[key])}; a key's values must have one shape",
                        "invalid_jsonl",
                    )
                else:
                    integral[key] = integral[key] and whole
                if keep_values:
                    values[key].append(obj[key])
            rows += 1
    if keys is None or rows == 0:
        raise refuse("the file has no JSON lines", "empty")
    columns = [Column(k, "int64" if integral[k] else "float64", shapes[k]) for k in keys]
    return columns, rows, values
