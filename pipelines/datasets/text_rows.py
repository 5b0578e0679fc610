"""Checking the rows of a text JSON Lines dataset: the kinds, the rules, one parser.

The public side is :mod:`pipelines.datasets.text_corpus` (which documents the four kinds); this
module reads a file line by line and checks every row, for the upload
(:func:`inspect_text_jsonl`, in the web process: no torch) and for the worker's loaders alike, so
what was accepted at upload is exactly what a stage reads.

The kind is decided by the keys of the first row and every row must be of that kind. Keys a kind
does not use are **refused**, not ignored (a misspelt ``"completoin"`` would otherwise turn into a
silently different dataset). Every string must be UTF-8 (no unpaired surrogate escapes), the
strings a row is about (text, prompt, completion, content, expected, name, tags) must not be
blank, a line is at most :data:`pipelines.datasets.text.MAX_LINE_CHARS` bytes (refused before it
is read whole) and the rows at most :data:`MAX_TEXT_ROWS`. A conversation may open with one
system message, then user and assistant messages alternate from user and end with the
assistant's. A ``regex`` pattern is compiled at upload (at most :data:`MAX_PATTERN_CHARS`
characters) and a ``json`` expected value must parse; test case names are unique. A refusal
names the line and what is wrong.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.datasets import text as _text
from pipelines.datasets.columns import refuse, shorten

TEXT_KINDS = ("text", "prompt_completion", "messages", "test_cases")
CHECKS = ("exact", "contains", "regex", "json")
ROLES = ("system", "user", "assistant")

MAX_TEXT_ROWS = 1_000_000
MAX_PATTERN_CHARS = 1_000  # a regex check's pattern (bounds, not removes, backtracking surprises)
MAX_MESSAGES = 1_000  # messages in one row
MAX_NAME_CHARS = 200  # a test case's name
MAX_TAGS = 32
MAX_TAG_CHARS = 100
SAMPLE_ROWS = 3  # rows kept in the schema for the dataset page
SAMPLE_CHARS = 300  # each sample string cut to this

# The keys each kind needs, and those it may have besides.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
    "test_cases": ("prompt", "expected", "check"),
}
_OPTIONAL: dict[str, tuple[str, ...]] = {"test_cases": ("name", "tags")}
_TEXT_KEYS = frozenset({"text", "prompt", "completion", "messages", "expected", "check"})
_KIND_HELP = (
    'a text dataset row is {"text": ...}, {"prompt": ..., "completion": ...}, '
    '{"messages": [{"role": ..., "content": ...}]} or a test case {"prompt": ..., '
    '"expected": ..., "check": "exact"|"contains"|"regex"|"json"}'
)


@dataclass
class TestCase:
    """One scenario: the prompt, what the output must satisfy and how it is checked."""

    __test__ = False  # not a pytest class, despite the name

    name: str
    prompt: str
    expected: str
    check: str
    tags: list[str] = field(default_factory=list)


# --- detecting the kind -------------------------------------------------------------------------


def kind_of_keys(keys: set[str] | frozenset[str]) -> str | None:
    """The kind a row with these keys is meant to be (by its telling keys), or None."""
    if "messages" in keys:
        return "messages"
    if "expected" in keys or "check" in keys:
        return "test_cases"
    if "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def is_tensor_case_row(obj: Any) -> bool:
    """Whether a parsed first JSON Lines row is a tensor model's test case
    (:mod:`pipelines.datasets.tensor_cases`) rather than a language model's.

    It has ``expected`` and ``check`` but no ``prompt``, and a ``name`` or model inputs
    (``input``/``inputs``), which no text row has.
    """
    if not isinstance(obj, dict) or "prompt" in obj or not {"expected", "check"} <= obj.keys():
        return False
    return bool({"name", "input", "inputs"} & obj.keys())


def is_text_row(obj: Any) -> bool:
    """Whether a parsed first JSON Lines row is meant as text (rather than numbers).

    It is when it has a key a text kind uses, or when every value is a string: a row of numbers
    with one string label stays with the tensor reader, whose refusal says to encode labels. A
    tensor model's test case (:func:`is_tensor_case_row`) is not text.
    """
    if not isinstance(obj, dict) or not obj or is_tensor_case_row(obj):
        return False
    return bool(_TEXT_KEYS & set(obj)) or all(isinstance(v, str) for v in obj.values())


# --- checking rows ------------------------------------------------------------------------------


def _string(value: Any, where: str) -> str:
    """``value`` if it is a non-blank UTF-8 string; ValueError naming ``where`` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{where} is {_json_type(value)}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"{where} is not UTF-8 text (it holds an unpaired surrogate escape such as \\ud800)"
        ) from None
    if not value.strip():
        raise ValueError(f"{where} is empty")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def _keys_problem(kind: str, obj: dict[str, Any]) -> str | None:
    required = _REQUIRED[kind]
    allowed = set(required) | set(_OPTIONAL.get(kind, ()))
    missing = [k for k in required if k not in obj]
    extra = sorted(set(obj) - allowed)
    parts = []
    if missing:
        parts.append(f"lacks {', '.join(map(repr, missing))}")
    if extra:
        parts.append(f"has key(s) {', '.join(map(repr, extra))} that a {kind} row does not use")
    if not parts:
        return None
    keys = " and ".join(repr(k) for k in required)
    more = f" (optional: {', '.join(map(repr, _OPTIONAL[kind]))})" if kind in _OPTIONAL else ""
    return f"{' and '.join(parts)}: every row of a {kind} dataset has {keys}{more}, nothing else"


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    if len(value) > MAX_MESSAGES:
        raise ValueError(f"'messages' holds more than {MAX_MESSAGES} messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value, start=1):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is {_json_type(message)}, not a {{role, content}} object")
        extra = sorted(set(message) - {"role", "content"})
        missing = [k for k in ("role", "content") if k not in message]
        if missing or extra:
            what = f"lacks {missing}" if missing else f"has key(s) {extra}"
            raise ValueError(f"{where} {what}: a message has 'role' and 'content', nothing else")
        role = message["role"]
        if role not in ROLES:
            raise ValueError(
                f"{where} has role {shorten(str(role))!r}; roles are {', '.join(ROLES)}"
            )
        content = _string(message["content"], f"{where} ({role}) content")
        out.append({"role": role, "content": content})
    start = 1 if out[0]["role"] == "system" else 0
    for i, message in enumerate(out[start:], start=start):
        role = message["role"]
        if role == "system":
            raise ValueError(f"message {i + 1} is a system message: only the first may be one")
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"message {i + 1} is {role!r} but {expected!r} was expected: after an optional "
                "system message, user and assistant messages alternate, starting with user"
            )
    if out[-1]["role"] != "assistant":
        raise ValueError(
            "the last message must be the assistant's (what the model learns to answer)"
        )
    return out


def compiled_pattern(pattern: str) -> re.Pattern[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(
            f"the regex pattern is {len(pattern)} characters, over the {MAX_PATTERN_CHARS} limit"
        )
    return _compile(pattern)


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"the regex pattern {shorten(pattern)!r} is invalid: {exc}") from None


def _test_case(obj: dict[str, Any], rowno: int) -> TestCase:
    prompt = _string(obj["prompt"], "'prompt'")
    check = obj["check"]
    if check not in CHECKS:
        raise ValueError(f"'check' is {shorten(str(check))!r}; checks are {', '.join(CHECKS)}")
    expected = _string(obj["expected"], "'expected'")
    if check == "regex":
        compiled_pattern(expected)
    elif check == "json":
        try:
            json.loads(expected)
        except (ValueError, RecursionError) as exc:
            raise ValueError(
                f"'expected' of a json check must be JSON text ({shorten(str(exc), 80)})"
            ) from None
    name = obj.get("name", f"case-{rowno}")
    name = _string(name, "'name'")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"'name' is longer than {MAX_NAME_CHARS} characters")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise ValueError(f"'tags' must be a list of at most {MAX_TAGS} strings")
    for tag in tags:
        _string(tag, "a tag")
        if len(tag) > MAX_TAG_CHARS:
            raise ValueError(f"tag {shorten(tag)!r} is longer than {MAX_TAG_CHARS} characters")
    return TestCase(name=name, prompt=prompt, expected=expected, check=check, tags=list(tags))


def _row(kind: str, obj: dict[str, Any], rowno: int) -> Any:
    """A checked row of ``kind``: str, (prompt, completion), messages or a TestCase."""
    if kind == "text":
        return _string(obj["text"], "'text'")
    if kind == "prompt_completion":
        return _string(obj["prompt"], "'prompt'"), _string(obj["completion"], "'completion'")
    if kind == "messages":
        return _messages(obj["messages"])
    return _test_case(obj, rowno)


# --- reading a file -----------------------------------------------------------------------------


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 file, each line checked before it is decoded.

    Read as bytes and decoded a line at a time, so a refusal names the very line that is too long
    (over ``MAX_LINE_CHARS`` bytes, refused before it is read whole) or is not UTF-8.
    """
    limit = _text.MAX_LINE_CHARS
    with Path(path).open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(limit + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > limit:
                raise refuse(
                    f"line {lineno} of the JSON Lines file is longer than {limit} bytes",
                    "line_too_long",
                )
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise refuse(
                    f"line {lineno} is not UTF-8 text (byte {exc.start + 1} of the line is "
                    f"0x{raw[exc.start]:02x}); save the file as UTF-8",
                    "unrecognised",
                ) from None


def first_row(path: Path) -> Any:
    """The first non-blank line of a JSON Lines file, parsed (None if it is not JSON)."""
    for _, line in text_lines(path):
        if line.strip():
            try:
                return json.loads(line)
            except (ValueError, RecursionError):
                return None
    return None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def json_objects(path: Path, no_constants: Any = _no_constants) -> Iterator[tuple[int, Any]]:
    """Every non-blank line of a JSON Lines file, parsed, with its line number; RejectedUpload
    naming the line that is not JSON. NaN and Infinity go through ``no_constants`` (refused)."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line, parse_constant=no_constants)
        except (ValueError, RecursionError) as exc:
            raise refuse(
                f"line {lineno} is not valid JSON: {shorten(str(exc), 120)}", "invalid_jsonl"
            ) from None


@dataclass
class ParsedText:
    """What :func:`parse_text_jsonl` read: the kind, the checked rows (when kept) and the facts
    the stored schema records (row count, sizes, samples, checks and tags of test cases)."""

    kind: str
    rows: list[Any]  # empty unless kept
    count: int
    samples: list[dict[str, Any]]
    chars: int
    max_row_chars: int
    checks: Counter[str]
    tags: Counter[str]


def _row_chars(kind: str, row: Any) -> int:
    if kind == "text":
        return len(row)
    if kind == "prompt_completion":
        return len(row[0]) + len(row[1])
    if kind == "messages":
        return sum(len(m["content"]) for m in row)
    return len(row.prompt) + len(row.expected)


def _sample(kind: str, row: Any) -> dict[str, Any]:
    def cut(text: str) -> str:
        return shorten(text, SAMPLE_CHARS)

    if kind == "text":
        return {"text": cut(row)}
    if kind == "prompt_completion":
        return {"prompt": cut(row[0]), "completion": cut(row[1])}
    if kind == "messages":
        return {"messages": [{"role": m["role"], "content": cut(m["content"])} for m in row[:6]]}
    return {
        "name": cut(row.name),
        "prompt": cut(row.prompt),
        "expected": cut(row.expected),
        "check": row.check,
        "tags": row.tags[:8],
    }


def parse_text_jsonl(path: Path, keep_rows: bool) -> ParsedText:
    """Read and check every line; RejectedUpload naming the line on anything wrong."""
    kind: str | None = None
    first_line = 0
    parsed = ParsedText("", [], 0, [], 0, 0, Counter(), Counter())
    names: dict[str, int] = {}
    for lineno, obj in json_objects(path):
        if not isinstance(obj, dict):
            raise refuse(
                f"line {lineno} is {_json_type(obj)}, not an object; {_KIND_HELP}",
                "invalid_jsonl",
            )
        row_kind = kind_of_keys(set(obj))
        if kind is None:
            if row_kind is None:
                keys = shorten(", ".join(map(repr, obj)), 120) or "no keys"
                raise refuse(
                    f"line {lineno} has {keys}, which is no text kind: {_KIND_HELP}",
                    "invalid_jsonl",
                )
            kind, first_line = row_kind, lineno
        elif row_kind is not None and row_kind != kind:
            raise refuse(
                f"line {lineno} is a {row_kind} row but line {first_line} made this a {kind} "
                "dataset: all rows must be of one kind",
                "invalid_jsonl",
            )
        problem = _keys_problem(kind, obj)
        if problem:
            raise refuse(f"line {lineno} {problem}", "invalid_jsonl")
        if parsed.count >= MAX_TEXT_ROWS:
            raise refuse(f"the file has more than {MAX_TEXT_ROWS} rows", "too_large")
        try:
            row = _row(kind, obj, parsed.count + 1)
        except (ValueError, RecursionError) as exc:
            raise refuse(f"line {lineno}: {exc}", "invalid_jsonl") from None
        if isinstance(row, TestCase):
            if row.name in names:
                raise refuse(
                    f"line {lineno}: test case name {shorten(row.name)!r} is already used on "
                    f"line {names[row.name]}; names must be unique",
                    "invalid_jsonl",
                )
            names[row.name] = lineno
            parsed.checks[row.check] += 1
            parsed.tags.update(row.tags)
        parsed.count += 1
        size = _row_chars(kind, row)
        parsed.chars += size
        parsed.max_row_chars = max(parsed.max_row_chars, size)
        if len(parsed.samples) < SAMPLE_ROWS:
            parsed.samples.append(_sample(kind, row))
        if keep_rows:
            parsed.rows.append(row)
    if kind is None or parsed.count == 0:
        raise refuse("the file has no JSON lines", "empty")
    parsed.kind = kind
    return parsed


def inspect_text_jsonl(path: Path) -> tuple[str, int, dict[str, Any]]:
    """Check a text JSON Lines file at upload: its kind, row count and the schema to store.

    The schema is ``{"text_kind", "rows", "chars", "max_row_chars", "samples"}`` (a few rows, each
    string cut to SAMPLE_CHARS, for the dataset page), plus ``"checks"`` (count per check) and
    ``"tags"`` (count per tag) for test cases. Raises RejectedUpload.
    """
    parsed = parse_text_jsonl(path, keep_rows=False)
    schema: dict[str, Any] = {
        "text_kind": parsed.kind,
        "rows": parsed.count,
        "chars": parsed.chars,
        "max_row_chars": parsed.max_row_chars,
        "samples": parsed.samples,
    }
    if parsed.kind == "test_cases":
        schema["checks"] = dict(sorted(parsed.checks.items()))
        schema["tags"] = dict(parsed.tags.most_common(50))
    return parsed.kind, parsed.count, schema
