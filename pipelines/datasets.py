"""Datasets: inspecting an upload without executing it, and feeding its rows to a model.

Three formats are accepted, decided by the file's content (the name only words refusals):

* **CSV** (``.csv``): a header row naming the columns, then rows of numbers separated by commas,
  every row with as many cells as the header. Only numbers: class labels must be integers.
* **JSON Lines** (``.jsonl``): one JSON object per line, the same keys on every line; each value
  is a number or a nested list of numbers (the same shape on every line).
* **npz** (``.npz``, what ``numpy.savez`` writes): a zip of ``.npy`` arrays that share their first
  dim (the rows). Only numeric and boolean arrays: object arrays need pickle, which runs code, so
  they are refused (read with ``allow_pickle=False`` only, their headers checked first).

:func:`inspect_dataset` runs in the web process on an upload and raises
:class:`~pipelines.formats.RejectedUpload` on anything it cannot read. :func:`load_split` runs in a
worker: it cuts the rows into train/validation/test with the dataset's seed and maps columns (or
arrays) onto the model's inputs; :func:`check_compatible` applies the same mapping rules to the
stored schema alone, so a job that could never run is refused before it is queued.

Mapping rules (one place, :func:`_plan`, used by both):

1. The target is ``ref.target``, else the first of ``label``, ``target``, ``y`` present, else none.
2. A model with several inputs reads one column/array per input, named after the input.
3. A one-input model reads, in this order of preference: an npz array or JSON Lines list key
   named after the input, or named ``features``; the single non-target npz array; for CSV and
   JSON Lines, all non-target columns in file order (list values flattened), concatenated.
4. The values of a row are reshaped to the input's non-batch dims (their product must match; one
   named dim is inferred) and cast to the input's dtype.
"""

from __future__ import annotations

import csv
import json
import math
import re
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.formats.errors import RejectedUpload

__all__ = [
    "DATASET_FORMATS",
    "SPLITS",
    "TARGET_NAMES",
    "DatasetInfo",
    "SplitData",
    "check_compatible",
    "inspect_dataset",
    "iter_batches",
    "load_split",
    "split_indices",
]

DATASET_FORMATS = ("csv", "jsonl", "npz")
SPLITS = ("train", "validation", "test", "all")
# Column names taken as the target when the dataset names none, in this order.
TARGET_NAMES = ("label", "target", "y")
# A one-input model reads a column/array of this name when none is named after the input.
FEATURES_NAME = "features"

MAX_DATASET_BYTES = 4 * 2**30  # the file, and an npz's unpacked members
MAX_LINE_CHARS = 16 * 2**20  # one CSV or JSON Lines line (a 3x224x224 image as text is ~2 MB)
MAX_COLUMNS = 100_000
MAX_NPZ_MEMBERS = 1_000
MAX_RANK = 8  # dims of one value (JSON Lines nesting, npz array rank after the rows)
# An npz member this big and compressed better than this is refused as a zip bomb. Deflate
# cannot do better than ~1030:1, so this only catches runs of identical bytes, which real data
# (even one-hot features) does not have at that length.
BOMB_MIN_BYTES = 16 * 2**20
BOMB_RATIO = 500

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".npz": "npz"}
_NUMERIC_KINDS = "biuf"  # bool, int, uint, float
_INT_LITERAL = re.compile(r"^\s*[+-]?\d+\s*$")
_OTHER_FORMATS = (
    (b"\x93NUMPY", "a single NumPy array (.npy); save the arrays with numpy.savez as an .npz"),
    (b"PAR1", "a Parquet file; convert it to CSV or npz"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file; convert it to npz"),
    (b"\x1f\x8b", "a gzip file; upload it uncompressed"),
)


# -- results ---------------------------------------------------------------------------------------


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
class _Column:
    """A column (CSV, JSON Lines) or array (npz): name, dtype and the shape of one row's value."""

    name: str
    dtype: str
    shape: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


# -- inspection ------------------------------------------------------------------------------------


def _refuse(message: str, code: str) -> RejectedUpload:
    return RejectedUpload(message, code=code)


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
        raise _refuse(f"the upload cannot be read ({exc.strerror})", "unreadable") from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse("the upload is not a regular file", "unreadable")
    size = st.st_size
    if size == 0:
        raise _refuse("the file is empty", "empty")
    if size > max_bytes:
        raise _refuse(f"the file is {size} bytes, over the {max_bytes}-byte limit", "too_large")
    with path.open("rb") as f:
        head = f.read(64)

    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        columns, rows, details = _inspect_npz(path, max_bytes)
        arrays = [{"name": c.name, "dtype": c.dtype, "shape": [rows, *c.shape]} for c in columns]
        return _info("npz", rows, {"arrays": arrays}, columns, {"bytes": size, **details})
    if ext == ".npz":
        raise _refuse(
            "not an npz file: an .npz must be the zip archive numpy.savez writes", "invalid_npz"
        )
    for magic, what in _OTHER_FORMATS:
        if head.startswith(magic):
            raise _refuse(f"unsupported dataset format ({what})", "unrecognised")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise _refuse(
            "pickle files are refused: loading one runs arbitrary code. Upload CSV, JSON Lines "
            "or npz",
            "pickle",
        )
    if b"\x00" in head:
        raise _refuse(
            "unrecognised dataset format (binary data); upload CSV, JSON Lines or npz",
            "unrecognised",
        )

    first = _first_text_char(path)
    if first == "{":
        columns, rows = _read_jsonl(path, keep_values=False)[:2]
        schema_columns: list[dict[str, Any]] = []
        for c in columns:
            entry: dict[str, Any] = {"name": c.name, "dtype": c.dtype}
            if c.shape:
                entry["shape"] = list(c.shape)
            schema_columns.append(entry)
        return _info("jsonl", rows, {"columns": schema_columns}, columns, {"bytes": size})
    if first == "[":
        raise _refuse(
            "this is a JSON array; write one JSON object per line (JSON Lines), e.g. "
            '{"x": [0.1, 0.2], "label": 1}',
            "invalid_jsonl",
        )
    if ext in (".jsonl", ".ndjson", ".json"):
        raise _refuse(
            "not JSON Lines: each line must be a JSON object starting with '{'", "invalid_jsonl"
        )
    columns, rows = _inspect_csv(path)
    schema = {"columns": [{"name": c.name, "dtype": c.dtype} for c in columns]}
    return _info("csv", rows, schema, columns, {"bytes": size, "delimiter": ","})


def _info(
    fmt: str, rows: int, schema: dict[str, Any], columns: list[_Column], details: dict[str, Any]
) -> DatasetInfo:
    names = [c.name for c in columns]
    target = next((n for n in TARGET_NAMES if n in names), None)
    details = {**details, "default_target": target}
    return DatasetInfo(format=fmt, rows=rows, schema=schema, details=details)


def _first_text_char(path: Path) -> str:
    """The first non-whitespace character of a UTF-8 text file (a RejectedUpload if not text)."""
    with path.open("rb") as f:
        raw = f.read(4096)
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = raw[: len(raw) - cut].decode("utf-8-sig")
        except UnicodeDecodeError:
            continue
        stripped = text.lstrip()
        return stripped[:1]
    raise _refuse(
        "unrecognised dataset format (not UTF-8 text); upload CSV, JSON Lines or npz",
        "unrecognised",
    )


def _bounded_lines(f: TextIO, what: str) -> Iterator[str]:
    """The lines of ``f``, refusing one longer than MAX_LINE_CHARS before reading all of it."""
    lineno = 0
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS + 1)
        except UnicodeDecodeError:
            raise _refuse(
                f"the {what} is not UTF-8 text (after line {lineno})", "unrecognised"
            ) from None
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise _refuse(
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


def _inspect_csv(path: Path) -> tuple[list[_Column], int]:
    """Check a CSV file; its columns (int64 where every value is an integer) and data row count."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(_bounded_lines(f, "CSV file"), strict=True)
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
                    raise _refuse(
                        f"line {line} has {len(record)} values but the header has "
                        f"{len(header)} columns; every row needs one value per column",
                        "invalid_csv",
                    )
                for i, cell in enumerate(record):
                    value = cell.strip()
                    if not value:
                        raise _refuse(
                            f"line {line}, column {header[i]!r} is empty: missing values are "
                            "not supported; fill or drop them",
                            "invalid_csv",
                        )
                    if integral[i] and _INT_LITERAL.match(value):
                        continue
                    try:
                        number = float(value)
                    except ValueError:
                        raise _refuse(
                            f"column {header[i]!r} holds text ({_shorten(value)!r} on line "
                            f"{line}): CSV datasets must be all numbers; encode class labels as "
                            "integers 0..C-1",
                            "invalid_csv",
                        ) from None
                    if not math.isfinite(number):
                        raise _refuse(
                            f"line {line}, column {header[i]!r} is {value!r}: only finite "
                            "numbers are supported",
                            "invalid_csv",
                        )
                    integral[i] = False
        except csv.Error as exc:
            raise _refuse(
                f"the CSV cannot be parsed at line {reader.line_num}: {exc}", "invalid_csv"
            ) from None
    if header is None:
        raise _refuse("the file has no lines", "empty")
    if rows == 0:
        raise _refuse("the CSV has a header but no data rows", "empty")
    columns = [
        _Column(name, "int64" if whole else "float64")
        for name, whole in zip(header, integral, strict=True)
    ]
    return columns, rows


def _csv_header(record: list[str]) -> list[str]:
    names = [cell.strip() for cell in record]
    if len(names) > MAX_COLUMNS:
        raise _refuse(f"the CSV has more than {MAX_COLUMNS} columns", "invalid_csv")
    if all(_is_number(n) for n in names):
        raise _refuse(
            "the first line must be a header row naming the columns (it holds only numbers), "
            "e.g. p0,p1,...,label",
            "invalid_csv",
        )
    for i, name in enumerate(names):
        if not name:
            raise _refuse(f"column {i + 1} of the header has no name", "invalid_csv")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _refuse(f"the header names column(s) {dupes} more than once", "invalid_csv")
    return names


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def _value_shape(value: Any, depth: int = 0) -> tuple[tuple[int, ...], bool]:
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
        shapes = [_value_shape(item, depth + 1) for item in value]
        first = shapes[0][0]
        if any(s != first for s, _ in shapes):
            raise ValueError("a ragged list (its items have different lengths)")
        return (len(value), *first), all(whole for _, whole in shapes)
    if isinstance(value, str):
        raise ValueError(f"text ({_shorten(value)!r}); encode class labels as integers 0..C-1")
    raise ValueError(f"a {type(value).__name__}, not a number or a list of numbers")


def _read_jsonl(path: Path, keep_values: bool) -> tuple[list[_Column], int, dict[str, list[Any]]]:
    """Check a JSON Lines file; its columns, row count and (if ``keep_values``) values by key."""
    keys: list[str] | None = None
    shapes: dict[str, tuple[int, ...]] = {}
    integral: dict[str, bool] = {}
    values: dict[str, list[Any]] = {}
    rows = 0
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(_bounded_lines(f, "JSON Lines file"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line, parse_constant=_json_constant)
            except (ValueError, RecursionError) as exc:
                raise _refuse(
                    f"line {lineno} is not valid JSON: {_shorten(str(exc), 120)}", "invalid_jsonl"
                ) from None
            if not isinstance(obj, dict):
                raise _refuse(
                    f"line {lineno} is a JSON {type(obj).__name__}, not an object; write one "
                    'object per line, e.g. {"x": [0.1, 0.2], "label": 1}',
                    "invalid_jsonl",
                )
            if keys is None:
                if not obj:
                    raise _refuse(f"line {lineno} is an empty object", "invalid_jsonl")
                if len(obj) > MAX_COLUMNS:
                    raise _refuse(
                        f"line {lineno} has more than {MAX_COLUMNS} keys", "invalid_jsonl"
                    )
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
                raise _refuse(
                    f"line {lineno} {' and '.join(parts)}: every line must have the same keys "
                    f"as the first ({_shorten(', '.join(keys), 120)})",
                    "invalid_jsonl",
                )
            for key in keys:
                try:
                    shape, whole = _value_shape(obj[key])
                except (ValueError, RecursionError) as exc:
                    raise _refuse(
                        f"line {lineno}, key {key!r}: {exc}; values must be numbers or nested "
                        "lists of numbers",
                        "invalid_jsonl",
                    ) from None
                if key not in shapes:
                    shapes[key] = shape
                    integral[key] = whole
                elif shapes[key] != shape:
                    raise _refuse(
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
        raise _refuse("the file has no JSON lines", "empty")
    columns = [_Column(k, "int64" if integral[k] else "float64", shapes[k]) for k in keys]
    return columns, rows, values


def _npz_members(path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The members of an npz zip, after the container checks (names, links, bombs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise _refuse(f"not a valid npz (zip) archive: {exc}", "invalid_npz") from None
    if not infos:
        raise _refuse("the npz archive is empty", "empty")
    if len(infos) > MAX_NPZ_MEMBERS:
        raise _refuse(f"the npz archive has more than {MAX_NPZ_MEMBERS} arrays", "zip_bomb")
    total = 0
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        shown = _shorten("".join(ch if ch.isprintable() else "?" for ch in name), 80)
        if not name.endswith(".npy") or any(not ch.isprintable() for ch in name):
            raise _refuse(
                f"npz member {shown!r} is not a .npy array; an npz holds only the arrays "
                "numpy.savez writes",
                "invalid_npz",
            )
        if name in seen:
            raise _refuse(f"npz member {shown!r} appears twice", "zip_unsafe")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise _refuse(f"npz member {shown!r} is encrypted", "zip_unsafe")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _refuse(
                f"npz member {shown!r} uses compression method {info.compress_type}; numpy "
                "only stores or deflates",
                "zip_unsafe",
            )
        total += info.file_size
        if total > max_bytes:
            raise _refuse(
                f"the npz archive unpacks to more than {max_bytes} bytes (the upload limit)",
                "zip_bomb",
            )
        if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(
            info.compress_size, 1
        ):
            ratio = info.file_size // max(info.compress_size, 1)
            raise _refuse(
                f"npz member {shown!r} is compressed {ratio}:1 (over {BOMB_RATIO}:1): refused "
                "as a zip bomb",
                "zip_bomb",
            )
    return infos


def _npy_header(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo
) -> tuple[np.dtype[Any], tuple[int, ...]]:
    """Dtype and shape from a .npy member's header (a Python literal, parsed without eval)."""
    name = info.filename[: -len(".npy")]
    fmt = np.lib.format
    try:
        with zf.open(info) as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            header_bytes = f.tell()
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
        raise _refuse(
            f"npz array {name!r} has no valid .npy header: {exc}", "invalid_npz"
        ) from None
    del fortran  # either memory order loads the same
    if dtype.hasobject:
        raise _refuse(
            f"npz array {name!r} holds Python objects (dtype object): loading it needs pickle, "
            "which runs code. Save plain numeric arrays (np.asarray(x, dtype=np.float32))",
            "pickle",
        )
    if dtype.names is not None or dtype.kind not in _NUMERIC_KINDS or dtype.subdtype is not None:
        hint = " (text: encode class labels as integers 0..C-1)" if dtype.kind in "SU" else ""
        raise _refuse(
            f"npz array {name!r} has dtype {dtype}{hint}; only numeric and boolean arrays are "
            "supported",
            "invalid_npz",
        )
    expected = header_bytes + math.prod(shape) * dtype.itemsize
    if info.file_size != expected:
        raise _refuse(
            f"npz array {name!r} is {info.file_size} bytes but its header describes "
            f"{expected}: the file is truncated or corrupt",
            "invalid_npz",
        )
    return dtype, tuple(int(d) for d in shape)


def _inspect_npz(path: Path, max_bytes: int) -> tuple[list[_Column], int, dict[str, Any]]:
    """Check an npz file from its zip directory and .npy headers, reading no array data."""
    infos = _npz_members(path, max_bytes)
    columns: list[_Column] = []
    rows: int | None = None
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            name = info.filename[: -len(".npy")]
            dtype, shape = _npy_header(zf, info)
            if not shape:
                raise _refuse(
                    f"npz array {name!r} is a scalar; every array needs one entry per row "
                    "(rows first)",
                    "invalid_npz",
                )
            if len(shape) - 1 > MAX_RANK:
                raise _refuse(
                    f"npz array {name!r} has more than {MAX_RANK + 1} dims", "invalid_npz"
                )
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise _refuse(
                    f"npz arrays have different row counts ({columns[0].name!r} has {rows}, "
                    f"{name!r} has {shape[0]}); every array needs one entry per row, rows first",
                    "invalid_npz",
                )
            columns.append(_Column(name, str(dtype.newbyteorder("=")), shape[1:]))
    assert rows is not None  # infos is not empty
    if rows == 0:
        raise _refuse("the npz arrays have no rows", "empty")
    unpacked = sum(i.file_size for i in infos)
    return columns, rows, {"members": len(infos), "unpacked_bytes": unpacked}


# -- splits ----------------------------------------------------------------------------------------


def _split_fractions(ref: DatasetRef) -> tuple[dict[str, float], int]:
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


# -- mapping columns onto model inputs -------------------------------------------------------------


@dataclass
class _InputPlan:
    spec: TensorSpec
    sources: list[str]
    row_shape: tuple[int, ...]


@dataclass
class _Plan:
    target: str | None
    inputs: list[_InputPlan]


def _values(n: int) -> str:
    return "1 value" if n == 1 else f"{n} values"


def _fmt_shape(shape: list[int | str] | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _columns_from_schema(ref: DatasetRef) -> list[_Column] | None:
    schema = ref.schema or {}
    try:
        if ref.format == "npz" and schema.get("arrays"):
            return [
                _Column(str(a["name"]), str(a["dtype"]), tuple(int(d) for d in a["shape"][1:]))
                for a in schema["arrays"]
            ]
        if ref.format in ("csv", "jsonl") and schema.get("columns"):
            return [
                _Column(str(c["name"]), str(c["dtype"]), tuple(int(d) for d in c.get("shape", [])))
                for c in schema["columns"]
            ]
    except (KeyError, TypeError, ValueError, IndexError):
        raise PipelineError(f"dataset {ref.id} has a malformed stored schema") from None
    return None


def _check_format(ref: DatasetRef) -> None:
    if ref.format not in DATASET_FORMATS:
        raise PipelineError(
            f"dataset {ref.id} has format {ref.format!r}; known formats: "
            + ", ".join(DATASET_FORMATS)
        )


def _resolve_dims(
    spec: TensorSpec, n_values: int, source_shape: tuple[int, ...], has: str
) -> tuple[int, ...]:
    """The non-batch dims of ``spec`` for rows of ``n_values`` values, or a PipelineError.

    ``has`` begins the message: "dataset 3 has 32 feature columns".
    """
    dims = list(spec.shape[1:])
    takes = f"model input {spec.name!r} takes {_fmt_shape(spec.shape)}"
    fixed = math.prod(d for d in dims if isinstance(d, int))
    named = [d for d in dims if isinstance(d, str)]
    if not named:
        if fixed != n_values:
            raise PipelineError(f"{has} but {takes} ({fixed} values per row)")
        return tuple(int(d) for d in dims)
    if len(named) == 1:
        if fixed == 0 or n_values == 0 or n_values % fixed:
            raise PipelineError(f"{has} but {takes} (a multiple of {fixed} values per row)")
        return tuple(int(d) if isinstance(d, int) else n_values // fixed for d in dims)
    if len(source_shape) == len(dims) and all(
        isinstance(d, str) or d == s for d, s in zip(dims, source_shape, strict=True)
    ):
        return source_shape
    raise PipelineError(
        f"{has} (shape {_fmt_shape(source_shape)}) but {takes}: with several named dims "
        f"({', '.join(named)}) each row's value must already have that shape"
    )


def _plan(ref: DatasetRef, columns: list[_Column], specs: list[TensorSpec]) -> _Plan:
    """Decide which columns feed which input and the target; PipelineError on any mismatch."""
    what = "array" if ref.format == "npz" else "column"
    by_name = {c.name: c for c in columns}
    listing = _shorten(", ".join(by_name), 200)
    if not specs:
        raise PipelineError("the model declares no inputs, so no dataset can be mapped onto it")
    for spec in specs:
        if not spec.shape:
            raise PipelineError(
                f"model input {spec.name!r} has no batch dim (shape []); rows cannot be fed to it"
            )

    if ref.target is not None:
        if ref.target not in by_name:
            raise PipelineError(
                f"dataset {ref.id} has no {what} {ref.target!r} (its target); its {what}s: "
                f"{listing}"
            )
        target: str | None = ref.target
    else:
        target = next((n for n in TARGET_NAMES if n in by_name), None)
    features = [c for c in columns if c.name != target]
    if not features:
        raise PipelineError(
            f"dataset {ref.id} has no feature {what}s besides the target {target!r}"
        )

    def named(spec: TensorSpec, column: _Column) -> _InputPlan:
        has = (
            f"dataset {ref.id} {what} {column.name!r} has {_values(column.size)} per row "
            f"(shape {_fmt_shape(column.shape)})"
        )
        return _InputPlan(spec, [column.name], _resolve_dims(spec, column.size, column.shape, has))

    if len(specs) > 1:
        missing = [s.name for s in specs if s.name not in by_name or s.name == target]
        if missing:
            inputs = ", ".join(repr(s.name) for s in specs)
            raise PipelineError(
                f"the model has inputs {inputs}; dataset {ref.id} has no {what} named "
                f"{', '.join(map(repr, missing))} (its {what}s: {listing}). A model with several "
                f"inputs needs one {what} per input, named after it"
                + (": use JSON Lines or npz" if ref.format == "csv" else "")
            )
        return _Plan(target, [named(s, by_name[s.name]) for s in specs])

    spec = specs[0]
    if ref.format != "csv":
        for name in (spec.name, FEATURES_NAME):
            column = by_name.get(name)
            # A JSON Lines number named like the input is one feature among the columns, not
            # the input's whole value: only a list (or an npz array) stands for the input.
            if column is not None and name != target and (ref.format == "npz" or column.shape):
                return _Plan(target, [named(spec, column)])
    if ref.format == "npz":
        if len(features) != 1:
            raise PipelineError(
                f"dataset {ref.id} has {len(features)} non-target arrays ({listing}) and none "
                f"is named {spec.name!r} (the model's input) or {FEATURES_NAME!r}; name the "
                "input array after the model input"
            )
        return _Plan(target, [named(spec, features[0])])
    n_values = sum(c.size for c in features)
    if all(not c.shape for c in features):
        has = f"dataset {ref.id} has {n_values} feature columns"
    else:
        has = (
            f"dataset {ref.id} has {n_values} feature values per row (columns "
            f"{_shorten(', '.join(c.name for c in features), 120)})"
        )
    source_shape = features[0].shape if len(features) == 1 else (n_values,)
    row_shape = _resolve_dims(spec, n_values, source_shape, has)
    return _Plan(target, [_InputPlan(spec, [c.name for c in features], row_shape)])


def check_compatible(ref: DatasetRef, input_specs: list[TensorSpec]) -> None:
    """Whether the dataset can feed a model with ``input_specs``, from ``ref.schema`` alone.

    Reads no file: it is meant for the web process, before a job is queued. Raises the same
    PipelineError as :func:`load_split` would; a ref without a stored schema is not checked.
    """
    _check_format(ref)
    _split_fractions(ref)
    columns = _columns_from_schema(ref)
    if columns is None:
        return
    _plan(ref, columns, input_specs)


# -- loading ---------------------------------------------------------------------------------------


def _load_csv(path: Path) -> tuple[list[_Column], dict[str, np.ndarray]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(_bounded_lines(f, "CSV file"))
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
    columns: list[_Column] = []
    values: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        column = data[:, i]
        whole = bool(np.all(np.isfinite(column)) and np.all(column == np.round(column)))
        columns.append(_Column(name, "int64" if whole else "float64"))
        values[name] = column.astype(np.int64) if whole else column
    return columns, values


def _load_jsonl(path: Path) -> tuple[list[_Column], dict[str, np.ndarray]]:
    try:
        columns, _, raw = _read_jsonl(path, keep_values=True)
    except RejectedUpload as exc:
        raise PipelineError(f"the JSON Lines file cannot be read: {exc.message}") from None
    values = {c.name: np.asarray(raw[c.name], dtype=np.dtype(c.dtype)) for c in columns}
    return columns, values


def _load_npz(path: Path) -> tuple[list[_Column], dict[str, np.ndarray]]:
    try:
        columns, _, _ = _inspect_npz(path, MAX_DATASET_BYTES)
    except RejectedUpload as exc:
        raise PipelineError(f"the npz file cannot be read: {exc.message}") from None
    values: dict[str, np.ndarray] = {}
    with np.load(path, allow_pickle=False) as npz:
        for c in columns:
            values[c.name] = np.asarray(npz[c.name])
    return columns, values


_LOADERS = {"csv": _load_csv, "jsonl": _load_jsonl, "npz": _load_npz}


def _cast(array: np.ndarray, spec: TensorSpec, ref: DatasetRef) -> np.ndarray:
    from pipelines.onnx_io import numpy_dtype

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
    _check_format(ref)
    fractions, seed = _split_fractions(ref)
    path = Path(ref.path)
    if not path.is_file():
        raise PipelineError(f"dataset {ref.id}: its file is missing on this worker ({path})")
    columns, values = _LOADERS[ref.format](path)
    plan = _plan(ref, columns, input_specs)
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
