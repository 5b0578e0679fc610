"""Input shapes typed by a user on the upload form (TorchScript files do not record them)."""

from __future__ import annotations

import re

from pipelines.core import TensorSpec
from pipelines.formats.errors import RejectedUpload

#: dtypes an input may declare (numpy names), and the spellings accepted for them.
INPUT_DTYPES = frozenset(
    {
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }
)
_DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "f32": "float32",
    "half": "float16",
    "fp16": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "double": "float64",
    "fp64": "float64",
    "f64": "float64",
    "long": "int64",
    "int": "int32",
}
MAX_INPUTS = 32
MAX_RANK = 16
MAX_DIM = 2**31 - 1
MAX_TEXT = 2000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}\Z")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_DIM_INT = re.compile(r"[0-9]{1,10}\Z")

EXAMPLE = "e.g. 'batch,64' or 'ids:batch,128:int64; mask:batch,128:int64'"


def _bad(message: str) -> RejectedUpload:
    return RejectedUpload(f"input shape: {message} ({EXAMPLE})", code="bad_shapes")


def normalize_dtype(text: str) -> str | None:
    """The numpy name for ``text`` ("fp16" -> "float16"), or None when it is not an input dtype."""
    key = text.strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    return key if key in INPUT_DTYPES else None


def parse_dim(text: str) -> int | str:
    """A positive int, or an identifier naming a dynamic axis ("batch")."""
    token = text.strip()
    if _DIM_INT.match(token):
        value = int(token)
        if value <= 0 or value > MAX_DIM:
            raise _bad(f"dimension {token} must be between 1 and {MAX_DIM}")
        return value
    if _DIM_NAME.match(token):
        return token
    if token in ("-1", "?", "None", "none", "*"):
        raise _bad(f"name dynamic axes instead of writing {token!r}, e.g. 'batch'")
    shown = token if len(token) <= 30 else token[:27] + "..."
    raise _bad(f"{shown!r} is neither a positive integer nor a name")


def _parse_dims(text: str) -> list[int | str]:
    body = text.strip()
    if len(body) >= 2 and body[0] + body[-1] in ("[]", "()"):
        body = body[1:-1]
    if not body.strip():
        raise _bad("an input needs at least one dimension")
    tokens = body.split(",")
    if tokens[-1].strip() == "" and len(tokens) > 1:  # a trailing comma, as in "(64,)"
        tokens = tokens[:-1]
    if len(tokens) > MAX_RANK:
        raise _bad(f"at most {MAX_RANK} dimensions per input")
    return [parse_dim(t) for t in tokens]


def parse_input_shapes(text: str, dtype: str = "float32") -> list[TensorSpec]:
    """Parse the upload form's shape field into input specs.

    ``"batch,64"`` is one input named "input" with shape ["batch", 64]; inputs are separated by
    ";" and may be named and typed: ``"ids:batch,128:int64; mask:batch,128:int64"``. A part with
    two fields is ``name:dims`` unless the second field is a dtype (``dims:dtype``). Unnamed inputs
    are called "input" (one) or "input_0", "input_1", ... (several). Raises RejectedUpload.
    """
    default = normalize_dtype(dtype)
    if default is None:
        raise _bad(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(INPUT_DTYPES))}")
    if not isinstance(text, str) or not text.strip():
        raise _bad("give the input shape")
    if len(text) > MAX_TEXT:
        raise _bad(f"the text is longer than {MAX_TEXT} characters")
    parts = [p.strip() for p in text.split(";")]
    parts = [p for p in parts if p]
    if not parts:
        raise _bad("give the input shape")
    if len(parts) > MAX_INPUTS:
        raise _bad(f"at most {MAX_INPUTS} inputs")

    parsed: list[tuple[str | None, list[int | str], str]] = []
    for part in parts:
        fields = [f.strip() for f in part.split(":")]
        name: str | None = None
        part_dtype = default
        if len(fields) == 1:
            dims_text = fields[0]
        elif len(fields) == 2:
            as_dtype = normalize_dtype(fields[1])
            if as_dtype is not None:
                dims_text, part_dtype = fields[0], as_dtype
            else:
                name, dims_text = fields
        elif len(fields) == 3:
            name, dims_text = fields[0], fields[1]
            as_dtype = normalize_dtype(fields[2])
            if as_dtype is None:
                known = ", ".join(sorted(INPUT_DTYPES))
                raise _bad(f"unknown dtype {fields[2][:30]!r}; use one of {known}")
            part_dtype = as_dtype
        else:
            raise _bad(f"{part[:40]!r} has too many ':'")
        if name is not None and not _NAME.match(name):
            raise _bad(f"input name {name[:40]!r} must start with a letter or '_' (max 64 chars)")
        parsed.append((name, _parse_dims(dims_text), part_dtype))

    unnamed = [i for i, (n, _, _) in enumerate(parsed) if n is None]
    specs: list[TensorSpec] = []
    for i, (name, dims, dt) in enumerate(parsed):
        if name is None:
            name = "input" if len(unnamed) == 1 else f"input_{unnamed.index(i)}"
        specs.append(TensorSpec(name=name, shape=dims, dtype=dt))
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _bad(f"input name {duplicates[0]!r} is used twice")
    return specs


def validate_specs(specs: object) -> list[TensorSpec]:
    """Check specs given programmatically (the API's declared inputs) by the same rules."""
    if not isinstance(specs, (list, tuple)) or not specs:
        raise _bad("give at least one input")
    if len(specs) > MAX_INPUTS:
        raise _bad(f"at most {MAX_INPUTS} inputs")
    out: list[TensorSpec] = []
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise _bad("declared inputs must be TensorSpec values")
        if not isinstance(spec.name, str) or not _NAME.match(spec.name):
            raise _bad(f"input name {str(spec.name)[:40]!r} must start with a letter or '_'")
        dt = normalize_dtype(spec.dtype) if isinstance(spec.dtype, str) else None
        if dt is None:
            raise _bad(f"unknown dtype {str(spec.dtype)[:30]!r} for input {spec.name!r}")
        if not isinstance(spec.shape, (list, tuple)) or not spec.shape:
            raise _bad(f"input {spec.name!r} needs at least one dimension")
        if len(spec.shape) > MAX_RANK:
            raise _bad(f"at most {MAX_RANK} dimensions per input")
        dims: list[int | str] = []
        for d in spec.shape:
            if isinstance(d, bool) or not isinstance(d, (int, str)):
                raise _bad(f"dimension {d!r} of input {spec.name!r} is not an int or a name")
            dims.append(parse_dim(str(d)))
        out.append(TensorSpec(name=spec.name, shape=dims, dtype=dt))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise _bad("input names must be unique")
    return out
