"""Bounded-memory validation of a safetensors header (no tensor data is read).

Layout: an 8-byte little-endian header length N, then N bytes of UTF-8 JSON (an object: tensor
name -> {"dtype", "shape", "data_offsets": [begin, end]}, plus an optional "__metadata__" object of
string -> string), then the data. Offsets are relative to the data and must tile it exactly.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from pipelines.formats.errors import RejectedUpload

#: The reference implementation refuses headers over 100 MB; so does this.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of each dtype safetensors defines.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}


def _bad(reason: str) -> RejectedUpload:
    return RejectedUpload(f"not a valid safetensors file: {reason}", code="invalid_safetensors")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _bad(f"the header names {key[:60]!r} twice")
        out[key] = value
    return out


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """The parsed, validated JSON header of the safetensors file at ``path``.

    Reads at most ``8 + min(N, max_header_bytes)`` bytes, and only after checking that N fits in
    the file, so a forged length (2**63, or past the end of the file) costs nothing. Raises
    RejectedUpload with the reason when anything is off.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise _bad(f"the file has {size} bytes, fewer than the 8-byte header length")
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > size - 8:
            raise _bad(
                f"the header length ({length} bytes) runs past the end of the file ({size} bytes)"
            )
        if length > max_header_bytes:
            raise _bad(f"the header length ({length} bytes) is over the {max_header_bytes} limit")
        if length < 2:
            raise _bad(f"the header length ({length} bytes) is too small for a JSON object")
        raw = f.read(length)
    if raw[:1] != b"{":
        raise _bad("the header is not a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RejectedUpload:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(f"the header is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise _bad("the header is not a JSON object")

    data_len = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _bad("__metadata__ must map strings to strings")
            continue
        shown = name[:60]
        if not isinstance(entry, dict):
            raise _bad(f"tensor {shown!r} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            raise _bad(f"tensor {shown!r} has unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _bad(f"tensor {shown!r} has a shape that is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_uint(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _bad(f"tensor {shown!r} has invalid data_offsets")
        begin, end = offsets
        if end > data_len:
            raise _bad(f"tensor {shown!r} ends at byte {end}, past the data ({data_len} bytes)")
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * DTYPE_BITS[str(dtype)]
        if (bits + 7) // 8 != end - begin:
            raise _bad(f"tensor {shown!r}: {end - begin} bytes do not fit shape {shape} {dtype}")
        spans.append((begin, end, shown))

    position = 0
    for begin, end, shown in sorted(spans):
        if begin != position:
            raise _bad(f"tensor {shown!r} overlaps another or leaves a gap at byte {position}")
        position = end
    if position != data_len:
        raise _bad(f"the tensors cover {position} of the {data_len} data bytes")
    return header
