"""npz datasets, checked from the zip directory and each .npy header, reading no array data.

The container is judged by the zip-safety check every uploaded archive passes
(:mod:`pipelines.formats.archives`); what is npz's own is here: only ``.npy`` members, numeric or
boolean dtypes (an object array needs pickle, which runs code), one row count for all arrays,
and a member size that matches its header.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.datasets.columns import MAX_RANK, Column, refuse, shorten
from pipelines.formats.archives import ZipRules, read_zip_members

# Arrays of one npz: each is a column or a model input, so more than this is not a dataset. A
# format bound, below the archives' shared one; bytes and ratios are bounded there for every zip.
MAX_NPZ_MEMBERS = 1_000
_NUMERIC_KINDS = "biuf"  # bool, int, uint, float


def npz_members(path: Path, max_bytes: int) -> list[zipfile.ZipInfo]:
    """The members of an npz zip, after the container checks (names, links, bombs)."""
    rules = ZipRules(
        "npz", "numpy", max_bytes, max_members=MAX_NPZ_MEMBERS, invalid_code="invalid_npz"
    )
    infos = read_zip_members(path, rules)
    if not infos:
        raise refuse("the npz archive is empty", "empty")
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise refuse(
                f"npz member {shorten(info.filename, 80)!r} is not a .npy array; an npz holds "
                "only the arrays numpy.savez writes",
                "invalid_npz",
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
        raise refuse(f"npz array {name!r} has no valid .npy header: {exc}", "invalid_npz") from None
    del fortran  # either memory order loads the same
    if dtype.hasobject:
        raise refuse(
            f"npz array {name!r} holds Python objects (dtype object): loading it needs pickle, "
            "which runs code. Save plain numeric arrays (np.asarray(x, dtype=np.float32))",
            "pickle",
        )
    if dtype.names is not None or dtype.kind not in _NUMERIC_KINDS or dtype.subdtype is not None:
        hint = " (text: encode class labels as integers 0..C-1)" if dtype.kind in "SU" else ""
        raise refuse(
            f"npz array {name!r} has dtype {dtype}{hint}; only numeric and boolean arrays are "
            "supported",
            "invalid_npz",
        )
    expected = header_bytes + math.prod(shape) * dtype.itemsize
    if info.file_size != expected:
        raise refuse(
            f"npz array {name!r} is {info.file_size} bytes but its header describes "
            f"{expected}: the file is truncated or corrupt",
            "invalid_npz",
        )
    return dtype, tuple(int(d) for d in shape)


def inspect_npz(path: Path, max_bytes: int) -> tuple[list[Column], int, dict[str, Any]]:
    """Check an npz file from its zip directory and .npy headers, reading no array data."""
    infos = npz_members(path, max_bytes)
    columns: list[Column] = []
    rows: int | None = None
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            name = info.filename[: -len(".npy")]
            dtype, shape = _npy_header(zf, info)
            if not shape:
                raise refuse(
                    f"npz array {name!r} is a scalar; every array needs one entry per row "
                    "(rows first)",
                    "invalid_npz",
                )
            if len(shape) - 1 > MAX_RANK:
                raise refuse(f"npz array {name!r} has more than {MAX_RANK + 1} dims", "invalid_npz")
            if rows is None:
                rows = shape[0]
            elif shape[0] != rows:
                raise refuse(
                    f"npz arrays have different row counts ({columns[0].name!r} has {rows}, "
                    f"{name!r} has {shape[0]}); every array needs one entry per row, rows first",
                    "invalid_npz",
                )
            columns.append(Column(name, str(dtype.newbyteorder("=")), shape[1:]))
    assert rows is not None  # infos is not empty
    if rows == 0:
        raise refuse("the npz arrays have no rows", "empty")
    unpacked = sum(i.file_size for i in infos)
    return columns, rows, {"members": len(infos), "unpacked_bytes": unpacked}
