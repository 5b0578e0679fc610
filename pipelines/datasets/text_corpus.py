"""Text datasets for language models: JSON Lines whose rows hold strings, of four kinds.

* ``text``: ``{"text": str}`` (language modelling, perplexity);
* ``prompt_completion``: ``{"prompt": str, "completion": str}`` (supervised fine-tuning);
* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  (chat; the consumer applies the tokenizer's chat template, this module does not);
* ``test_cases``: ``{"prompt": str, "expected": str, "check": "exact"|"contains"|"regex"|"json",
  "name": str, "tags": [str]}`` (``name``, default ``case-<row>``, and ``tags`` optional) for the
  scenario level.

A text dataset is stored with format ``jsonl`` like a numeric one; its schema says what it is:
``{"text_kind", "rows", ...}`` (:func:`text_kind` reads it). The rules an upload must follow and
the parser that enforces them are in :mod:`pipelines.datasets.text_rows`; this module is what
stages use in a worker: the loaders cut the rows into splits exactly as a tensor dataset of as
many rows is cut (:mod:`pipelines.datasets.splits`), :func:`check_case` judges an output, and
:func:`check_fits` says which datasets a model can read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pipelines.core import DatasetRef, PipelineError
from pipelines.datasets.columns import SPLITS
from pipelines.datasets.splits import split_fractions, split_indices
from pipelines.datasets.text_rows import (
    CHECKS,
    MAX_PATTERN_CHARS,
    MAX_TEXT_ROWS,
    ROLES,
    TEXT_KINDS,
    TestCase,
    compiled_pattern,
    first_row,
    inspect_text_jsonl,
    is_text_row,
    kind_of_keys,
    parse_text_jsonl,
)
from pipelines.formats.errors import RejectedUpload

MAX_OUTPUT_SCAN = 100_000  # characters of a model's output a json check looks through

__all__ = [
    "CHECKS",
    "MAX_PATTERN_CHARS",
    "MAX_TEXT_ROWS",
    "ROLES",
    "TEXT_KINDS",
    "TestCase",
    "check_case",
    "check_fits",
    "inspect_text_jsonl",
    "is_text_jsonl",
    "is_text_row",
    "load_cases",
    "load_chats",
    "load_pairs",
    "load_texts",
    "text_kind",
]


def is_text_jsonl(path: Path) -> bool:
    """Whether a JSON Lines file is meant as a text dataset, judged by its first row."""
    return is_text_row(first_row(path))


def text_kind(ref: DatasetRef) -> str | None:
    """The kind of a text dataset (one of TEXT_KINDS), None for a tensor dataset.

    From ``ref.schema["text_kind"]`` as recorded at upload; a ref without a schema is sniffed
    from its file's first row (a tensor schema, with columns, arrays or tensor test cases, is
    never read).
    """
    schema = ref.schema or {}
    kind = schema.get("text_kind")
    if kind in TEXT_KINDS:
        return str(kind)
    if ref.format != "jsonl" or any(schema.get(k) for k in ("columns", "arrays", "test_cases")):
        return None
    try:
        obj = first_row(Path(ref.path))
    except (OSError, RejectedUpload):
        return None
    return kind_of_keys(set(obj)) if is_text_row(obj) else None


# --- loading a split in a worker ----------------------------------------------------------------


def _load(ref: DatasetRef, split: str, wanted: tuple[str, ...], use: str) -> tuple[str, list]:
    """The checked rows of ``split`` of a text dataset whose kind is one of ``wanted``.

    ``split`` is "train", "validation", "test" (cut by ``ref.splits``, the same seeded cut as a
    tensor dataset of as many rows) or "all" (file order). A split with no rows (a dataset too
    small for its fractions) falls back to all the rows.
    """
    if split not in SPLITS:
        raise PipelineError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    if ref.format != "jsonl":
        raise PipelineError(
            f"dataset {ref.id} is {ref.format}; {use} needs a text JSON Lines dataset "
            f"({' or '.join(wanted)})"
        )
    path = Path(ref.path)
    if not path.is_file():
        raise PipelineError(f"dataset {ref.id}: its file is missing on this worker ({path})")
    try:
        parsed = parse_text_jsonl(path, keep_rows=True)
    except RejectedUpload as exc:
        raise PipelineError(f"dataset {ref.id} cannot be read as text: {exc.message}") from None
    if parsed.kind not in wanted:
        raise PipelineError(
            f"dataset {ref.id} is a {parsed.kind} dataset; {use} needs {' or '.join(wanted)}"
        )
    fractions, seed = split_fractions(ref)
    index = split_indices(parsed.count, fractions, seed)[split]
    if len(index) == 0:
        return parsed.kind, parsed.rows
    return parsed.kind, [parsed.rows[int(i)] for i in index]


def load_texts(ref: DatasetRef, split: str = "test") -> list[str]:
    """The texts of ``split``: a text row's text, a prompt and its completion joined (as the
    model reads them, nothing between), a conversation's contents joined by newlines.

    ``split`` is "train", "validation", "test" (the same seeded cut of ``ref.splits`` as a
    tensor dataset of as many rows: the same rows in the same split every time) or "all" (file
    order). A split with no rows (a dataset too small for its fractions) falls back to all rows.
    Test cases have no reference text: a PipelineError says to use another kind.
    """
    kind, rows = _load(ref, split, ("text", "prompt_completion", "messages"), "perplexity")
    if kind == "text":
        return list(rows)
    if kind == "prompt_completion":
        return [prompt + completion for prompt, completion in rows]
    return ["\n".join(m["content"] for m in row) for row in rows]


def load_pairs(ref: DatasetRef, split: str = "train") -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of ``split`` of a prompt_completion dataset.

    Splits as :func:`load_texts`: the tensor datasets' seeded cut; an empty split reads all rows.
    """
    return _load(ref, split, ("prompt_completion",), "training on prompt/completion pairs")[1]


def load_chats(ref: DatasetRef, split: str = "train") -> list[list[dict[str, str]]]:
    """The conversations (lists of ``{"role", "content"}``) of ``split`` of a messages dataset.

    Each opens with at most one system message, then user and assistant alternate, ending with
    the assistant. Splits as :func:`load_texts`.
    """
    return _load(ref, split, ("messages",), "training on conversations")[1]


def load_cases(ref: DatasetRef, split: str = "test") -> list[TestCase]:
    """The test cases of ``split`` of a test_cases dataset (splits as :func:`load_texts`)."""
    return _load(ref, split, ("test_cases",), "test-case accuracy")[1]


# --- checking an output -------------------------------------------------------------------------


def _first_json(text: str) -> tuple[bool, Any]:
    """The first JSON value in ``text``: the whole (stripped) text, else the first object or
    array that parses from a ``{`` or ``[`` (a value inside a code fence or after words)."""
    text = text[:MAX_OUTPUT_SCAN].strip()
    decoder = json.JSONDecoder()
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError):
        pass
    for match in re.finditer(r"[\[{]", text):
        try:
            return True, decoder.raw_decode(text, match.start())[0]
        except (ValueError, RecursionError):
            continue
    return False, None


def _json_equal(a: Any, b: Any) -> bool:
    """JSON equality that tells true from 1 and 1 from "1" (Python's == does not for bools)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check_case(case: TestCase, output: str) -> bool:
    """Whether a model's ``output`` passes ``case``.

    exact: equal once both are stripped of surrounding whitespace; contains: ``expected`` is a
    substring; regex: ``re.search(expected, output)`` finds a match; json: the first JSON value in
    the output equals ``json.loads(expected)`` (types respected: true is not 1).
    """
    if case.check == "exact":
        return output.strip() == case.expected.strip()
    if case.check == "contains":
        return case.expected in output
    if case.check == "regex":
        try:
            return compiled_pattern(case.expected).search(output) is not None
        except ValueError as exc:
            raise PipelineError(f"test case {case.name!r}: {exc}") from None
    if case.check == "json":
        try:
            expected = json.loads(case.expected)
        except (ValueError, RecursionError):
            raise PipelineError(
                f"test case {case.name!r}: its expected value is not JSON"
            ) from None
        found, value = _first_json(output)
        return found and _json_equal(value, expected)
    raise PipelineError(f"test case {case.name!r} has unknown check {case.check!r}")


# --- which datasets fit which models ------------------------------------------------------------


def check_fits(ref: DatasetRef, model_format: str, input_specs: list) -> None:
    """Whether the dataset can feed a model of ``model_format``; PipelineError with the reason.

    A language model (:data:`pipelines.llm.TEXT_FORMATS`) reads text datasets only; any other
    model reads tensor datasets only, checked against its inputs by
    :func:`pipelines.datasets.mapping.check_compatible`. Reads no file when the stored schema
    says what the dataset is (every dataset uploaded since text datasets exist).
    """
    from pipelines.datasets.mapping import check_compatible
    from pipelines.llm import is_text_format

    kind = text_kind(ref)
    if is_text_format(model_format):
        if (ref.schema or {}).get("test_cases"):
            raise PipelineError(
                f"dataset {ref.id} holds a tensor model's test cases (numbers in, numbers out); "
                "a language model reads a text JSON Lines dataset, its test cases with a prompt"
            )
        if kind is None:
            raise PipelineError(
                f"dataset {ref.id} holds numbers ({ref.format}); a language model reads a text "
                "JSON Lines dataset (text, prompt/completion, messages or test cases)"
            )
        split_fractions(ref)
        return
    if kind is not None:
        raise PipelineError(
            f"dataset {ref.id} is a text dataset ({kind}); only language models read text, "
            "this model takes tensors (CSV, numeric JSON Lines or npz)"
        )
    check_compatible(ref, input_specs)
