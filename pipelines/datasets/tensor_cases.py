"""Test cases for tensor models: the JSON Lines file the certification's scenario level runs.

One case a line, recognised by the first row's keys (``name``, ``expected`` and ``check`` without
``prompt``: :func:`pipelines.datasets.text_rows.is_tensor_case_row`)::

    {"name": "fraud-001", "inputs": {"x": [[0.1, 0.2]]}, "expected": 1, "check": "argmax"}
    {"name": "scan-7", "input": [0.5, 0.2], "expected": [0.1, 0.9], "check": "within", "atol": 0.01}

``inputs`` maps model input names to one sample each (no batch dim); ``input`` is the one input of
a one-input model. Checks: ``equals``, ``argmax``, ``within`` (``atol`` and/or ``rtol``),
``top_k`` (``k``, default 5) and ``cosine`` (``min_cosine``, default 0.99); optional ``output``,
``tags`` and ``description``. Every case feeds the same inputs.

This module reads and checks the file, the same way at upload (in the web process) and in a
worker; judging a model's outputs is :mod:`pipelines.certification.test_cases`. Anything wrong is
a :class:`~pipelines.formats.RejectedUpload` naming the line; nothing is executed or unpickled.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.datasets.columns import MAX_DATASET_BYTES, refuse, shorten
from pipelines.datasets.text import value_shape
from pipelines.datasets.text_rows import CHECKS as TEXT_CHECKS
from pipelines.datasets.text_rows import MAX_NAME_CHARS, MAX_TAG_CHARS, MAX_TAGS, json_objects

CHECKS = ("equals", "argmax", "within", "top_k", "cosine")
MAX_CASES = 10_000
MAX_DESCRIPTION_CHARS = 2_000
DEFAULT_K = 5
DEFAULT_MIN_COSINE = 0.99
SINGLE_INPUT = "input"  # how a case's ``input`` (a one-input model's) is named in summaries

# The settings each check takes; any other check's setting on a row is refused.
_PARAMS: dict[str, tuple[str, ...]] = {
    "equals": (),
    "argmax": (),
    "within": ("atol", "rtol"),
    "top_k": ("k",),
    "cosine": ("min_cosine",),
}
_ALL_PARAMS = ("atol", "rtol", "k", "min_cosine")
_KEYS = frozenset(
    {"name", "inputs", "input", "expected", "check", "output", "tags", "description", *_ALL_PARAMS}
)


@dataclass
class TestCase:
    """One case: what to feed (one sample), what the output must be and how it is judged.

    ``inputs`` is a dict (the row's ``inputs``) or one array (its ``input``); ``params`` holds the
    check's settings with defaults filled in (``atol``/``rtol``, ``k``, ``min_cosine``).
    """

    __test__ = False  # not a pytest class, despite the name

    name: str
    inputs: dict[str, np.ndarray] | np.ndarray
    expected: np.ndarray
    check: str
    params: dict[str, float]
    output: str | None
    tags: tuple[str, ...]
    description: str = ""

    @property
    def input_names(self) -> list[str]:
        """The inputs the case feeds (``["input"]`` for a case written with ``input``)."""
        return list(self.inputs) if isinstance(self.inputs, dict) else [SINGLE_INPUT]


# --- checking one row ---------------------------------------------------------------------------


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number (NaN and Infinity are refused)")


def _text(value: Any, where: str, limit: int) -> str:
    """``value`` if it is a non-blank UTF-8 string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where} must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{where} is not UTF-8 text (an unpaired surrogate escape)") from None
    if len(value) > limit:
        raise ValueError(f"{where} is longer than {limit} characters")
    return value


def _numbers(value: Any, where: str) -> np.ndarray:
    """A number or nested list of numbers as an int64 or float64 array."""
    try:
        _, whole = value_shape(value)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{where}: {exc}; values are numbers or nested lists of numbers") from None
    try:
        return np.asarray(value, dtype=np.int64 if whole else np.float64)
    except OverflowError:
        raise ValueError(f"{where} holds an integer too large for int64") from None


def _keys(obj: dict[str, Any]) -> None:
    missing = [repr(k) for k in ("name", "expected", "check") if k not in obj]
    if "input" not in obj and "inputs" not in obj:
        missing.append("'inputs' (or 'input' for a one-input model)")
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}")
    if "input" in obj and "inputs" in obj:
        raise ValueError("has both 'input' and 'inputs': use one ('inputs' names each input)")
    unknown = sorted(set(obj) - _KEYS)
    if unknown:
        raise ValueError(
            f"has key(s) {shorten(', '.join(map(repr, unknown)), 120)} that a test case does not "
            f"use (its keys: {', '.join(sorted(_KEYS))})"
        )


def _check(obj: dict[str, Any]) -> str:
    check = obj["check"]
    if check not in CHECKS:
        hint = ""
        if check in TEXT_CHECKS:
            hint = f" ({check!r} is a language model's check: those test cases have a 'prompt')"
        raise ValueError(
            f"'check' is {shorten(str(check))!r}; checks are {', '.join(CHECKS)}{hint}"
        )
    foreign = [k for k in _ALL_PARAMS if k in obj and k not in _PARAMS[check]]
    if foreign:
        raise ValueError(f"{foreign[0]!r} is no setting of the {check} check")
    return str(check)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number")
    return float(value)


def _class_index(expected: np.ndarray, check: str) -> None:
    if expected.ndim or expected.dtype.kind != "i" or int(expected) < 0:
        raise ValueError(
            f"'expected' of a {check} check must be a class index (a whole number >= 0)"
        )


def _params(obj: dict[str, Any], check: str, expected: np.ndarray) -> dict[str, float]:
    """The check's settings, defaults filled in; ValueError on a bad one or a bad ``expected``."""
    if check == "within":
        if "atol" not in obj and "rtol" not in obj:
            raise ValueError("a within check needs 'atol' and/or 'rtol'")
        tolerances = {k: _number(obj.get(k, 0.0), repr(k)) for k in ("atol", "rtol")}
        if min(tolerances.values()) < 0:
            raise ValueError("'atol' and 'rtol' must be >= 0")
        return tolerances
    if check == "top_k":
        k = obj.get("k", DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError("'k' must be a whole number >= 1")
        _class_index(expected, check)
        return {"k": k}
    if check == "cosine":
        least = _number(obj.get("min_cosine", DEFAULT_MIN_COSINE), "'min_cosine'")
        if not -1 < least <= 1:
            raise ValueError("'min_cosine' must be in (-1, 1]")
        if not np.any(expected):
            raise ValueError("'expected' of a cosine check is all zeros (it has no direction)")
        return {"min_cosine": least}
    if check == "argmax" and expected.ndim == 0:
        _class_index(expected, check)
    return {}


def _inputs(obj: dict[str, Any]) -> dict[str, np.ndarray] | np.ndarray:
    if "input" in obj:
        return _numbers(obj["input"], "'input'")
    raw = obj["inputs"]
    if not isinstance(raw, dict) or not raw:
        raise ValueError("'inputs' must be an object of model input name -> values")
    return {
        _text(name, "an input name", MAX_NAME_CHARS): _numbers(value, f"input {name!r}")
        for name, value in raw.items()
    }


def _tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_TAGS:
        raise ValueError(f"'tags' must be a list of at most {MAX_TAGS} strings")
    return tuple(dict.fromkeys(_text(tag, "a tag", MAX_TAG_CHARS) for tag in value))


def _case(obj: dict[str, Any]) -> TestCase:
    _keys(obj)
    check = _check(obj)
    expected = _numbers(obj["expected"], "'expected'")
    output = obj.get("output")
    description = obj.get("description")
    if description is not None:
        description = _text(description, "'description'", MAX_DESCRIPTION_CHARS)
    return TestCase(
        name=_text(obj["name"], "'name'", MAX_NAME_CHARS),
        inputs=_inputs(obj),
        expected=expected,
        check=check,
        params=_params(obj, check, expected),
        output=None if output is None else _text(output, "'output'", MAX_NAME_CHARS),
        tags=_tags(obj.get("tags", [])),
        description=description or "",
    )


# --- reading a file -----------------------------------------------------------------------------


def iter_test_cases(path: Path, max_bytes: int = MAX_DATASET_BYTES) -> Iterator[TestCase]:
    """Every case of the file in order, each checked; RejectedUpload naming the line otherwise.

    Names are unique, every case feeds the same inputs, at most MAX_CASES cases and ``max_bytes``.
    """
    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise refuse(f"the test cases cannot be read ({exc.strerror})", "unreadable") from None
    if size > max_bytes:
        raise refuse(f"the file is {size} bytes, over the {max_bytes}-byte limit", "too_large")
    names: dict[str, int] = {}
    first_inputs: tuple[list[str], int] | None = None
    for lineno, obj in json_objects(path, _no_constants):
        if not isinstance(obj, dict):
            raise refuse(f"line {lineno} is not a JSON object (one case a line)", "invalid_jsonl")
        if len(names) >= MAX_CASES:
            raise refuse(
                f"line {lineno}: the file has more than {MAX_CASES} test cases", "too_large"
            )
        try:
            case = _case(obj)
        except (ValueError, RecursionError) as exc:
            raise refuse(f"line {lineno}: {exc}", "invalid_jsonl") from None
        if case.name in names:
            raise refuse(
                f"line {lineno}: test case name {shorten(case.name)!r} is already used on line "
                f"{names[case.name]}; names must be unique",
                "invalid_jsonl",
            )
        names[case.name] = lineno
        if first_inputs is None:
            first_inputs = (case.input_names, lineno)
        elif sorted(case.input_names) != sorted(first_inputs[0]):
            raise refuse(
                f"line {lineno} feeds {case.input_names} but line {first_inputs[1]} feeds "
                f"{first_inputs[0]}; every case feeds the model the same inputs",
                "invalid_jsonl",
            )
        yield case
    if not names:
        raise refuse("the file has no test cases", "empty")


def parse_test_cases(path: Path, max_bytes: int = MAX_DATASET_BYTES) -> list[TestCase]:
    """Every case of a test-case JSON Lines file, checked (RejectedUpload naming the line)."""
    return list(iter_test_cases(path, max_bytes))


def inspect_test_cases(path: Path, max_bytes: int = MAX_DATASET_BYTES) -> tuple[int, dict]:
    """Check a test-case file at upload: its case count and ``schema["test_cases"]``.

    ``{"count", "checks": {check: n}, "tags": {tag: n} (the 50 most used), "inputs": [names]}``;
    the cases are read one at a time and none is kept.
    """
    checks: Counter[str] = Counter()
    tags: Counter[str] = Counter()
    inputs: list[str] = []
    count = 0
    for case in iter_test_cases(path, max_bytes):
        count += 1
        checks[case.check] += 1
        tags.update(case.tags)
        inputs = inputs or case.input_names
    summary = {
        "count": count,
        "checks": dict(sorted(checks.items())),
        "tags": dict(tags.most_common(50)),
        "inputs": inputs,
    }
    return count, summary
