"""Text datasets for language models: each kind inspected and loaded, splits, checks, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.datasets import (
    TestCase,
    check_case,
    check_fits,
    inspect_dataset,
    load_cases,
    load_chats,
    load_pairs,
    load_split,
    load_texts,
    split_indices,
    text_kind,
    text_rows,
)
from pipelines.datasets import text as dataset_text
from pipelines.formats import RejectedUpload

SPLITS = {"train": 0.6, "validation": 0.2, "test": 0.2, "seed": 7}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ref_for(path: Path, splits: dict | None = None, schema: bool = True) -> DatasetRef:
    """A DatasetRef as the web layer stores it: format and schema from the inspector."""
    info = inspect_dataset(path, path.name)
    return DatasetRef(
        id="7",
        path=str(path),
        format=info.format,
        splits=dict(splits or SPLITS),
        schema=info.schema if schema else {},
    )


def refusal(tmp_path: Path, rows: list[object] | bytes, name: str = "bad.jsonl") -> str:
    path = tmp_path / name
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        write_jsonl(path, rows)
    with pytest.raises(RejectedUpload) as info:
        inspect_dataset(path, name)
    return info.value.message


TEXTS = [{"text": f"sentence number {i} about foxes"} for i in range(20)]
PAIRS = [{"prompt": f"Q{i}: two plus {i}?", "completion": f" {2 + i}"} for i in range(10)]
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Say {i}."},
            {"role": "assistant", "content": f"{i}"},
        ]
    }
    for i in range(5)
] + [
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "hello again"},
        ]
    }
]
CASES = [
    {"prompt": "Capital of France?", "expected": "Paris", "check": "contains", "tags": ["geo"]},
    {"prompt": "2+2=", "expected": "4", "check": "exact", "name": "sum"},
    {"prompt": "A year:", "expected": r"\b(19|20)\d\d\b", "check": "regex"},
    {"prompt": "JSON please", "expected": '{"answer": 42, "ok": true}', "check": "json"},
]


# --- each kind: inspected, stored schema, loaded ----------------------------------------------


def test_a_text_dataset_is_inspected_with_its_kind_rows_and_samples(tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", TEXTS)
    info = inspect_dataset(path, "lm.jsonl")
    assert (info.format, info.rows) == ("jsonl", 20)
    assert info.schema["text_kind"] == "text" and info.schema["rows"] == 20
    assert info.schema["samples"] == [{"text": r["text"]} for r in TEXTS[:3]]
    assert info.schema["max_row_chars"] == max(len(r["text"]) for r in TEXTS)
    assert info.details["default_target"] is None
    assert "columns" not in info.schema  # nothing a tensor model could map onto


def test_each_kind_is_detected_and_loaded(tmp_path):
    texts = ref_for(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    pairs = ref_for(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    chats = ref_for(write_jsonl(tmp_path / "m.jsonl", CHATS))
    cases = ref_for(write_jsonl(tmp_path / "c.jsonl", CASES))
    assert [text_kind(r) for r in (texts, pairs, chats, cases)] == [
        "text",
        "prompt_completion",
        "messages",
        "test_cases",
    ]
    assert sorted(load_texts(texts, "all")) == sorted(r["text"] for r in TEXTS)
    assert load_pairs(pairs, "all") == [(r["prompt"], r["completion"]) for r in PAIRS]
    # perplexity over prompt/completion reads them as the model does: joined, nothing between
    assert load_texts(pairs, "all")[0] == "Q0: two plus 0? 2"
    assert load_chats(chats, "all") == [r["messages"] for r in CHATS]
    assert load_texts(chats, "all")[0] == "Be brief.\nSay 0.\n0"
    got = load_cases(cases, "all")
    assert [c.name for c in got] == ["case-1", "sum", "case-3", "case-4"]
    assert got[0] == TestCase("case-1", "Capital of France?", "Paris", "contains", ["geo"])
    assert ref_for(tmp_path / "c.jsonl").schema["checks"] == {
        "contains": 1,
        "exact": 1,
        "json": 1,
        "regex": 1,
    }


def test_a_ref_without_a_stored_schema_is_sniffed_from_its_file(tmp_path):
    ref = ref_for(write_jsonl(tmp_path / "p.jsonl", PAIRS), schema=False)
    assert text_kind(ref) == "prompt_completion"
    numeric = write_jsonl(tmp_path / "n.jsonl", [{"x": [1.0, 2.0], "label": 1}])
    assert text_kind(ref_for(numeric, schema=False)) is None
    assert text_kind(ref_for(numeric)) is None


def test_a_loader_refuses_the_wrong_kind_with_what_it_needs(tmp_path):
    cases = ref_for(write_jsonl(tmp_path / "c.jsonl", CASES))
    with pytest.raises(PipelineError, match="test_cases dataset; perplexity needs text"):
        load_texts(cases)
    texts = ref_for(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    with pytest.raises(PipelineError, match="needs prompt_completion"):
        load_pairs(texts)
    with pytest.raises(PipelineError, match="needs messages"):
        load_chats(texts)
    with pytest.raises(PipelineError, match="unknown split 'holdout'"):
        load_texts(texts, "holdout")
    csv = tmp_path / "n.csv"
    csv.write_text("a,label\n1,0\n")
    with pytest.raises(PipelineError, match="dataset 7 is csv; perplexity needs a text JSON"):
        load_texts(ref_for(csv))


# --- splits --------------------------------------------------------------------------------------


def test_splits_are_deterministic_disjoint_and_the_tensor_cut(tmp_path):
    ref = ref_for(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    parts = {s: load_texts(ref, s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in parts.items()} == {"train": 12, "validation": 4, "test": 4}
    assert parts == {s: load_texts(ref, s) for s in parts}  # the same every time
    seen = [t for rows in parts.values() for t in rows]
    assert sorted(seen) == sorted(r["text"] for r in TEXTS)  # every row in exactly one split
    # the same rows a tensor dataset of 20 rows puts in each split, with the same seed
    index = split_indices(20, SPLITS, 7)
    for split, rows in parts.items():
        assert rows == [TEXTS[int(i)]["text"] for i in index[split]]
    other = ref_for(tmp_path / "t.jsonl", {**SPLITS, "seed": 8})
    assert load_texts(other, "test") != parts["test"]


def test_an_empty_split_falls_back_to_all_rows(tmp_path):
    ref = ref_for(write_jsonl(tmp_path / "c.jsonl", CASES), {"train": 1.0, "seed": 0})
    assert len(load_cases(ref, "test")) == len(CASES)
    assert [c.name for c in load_cases(ref, "test")] == [c.name for c in load_cases(ref, "all")]


# --- checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "expected", "output", "passes"),
    [
        ("exact", "4", "  4\n", True),
        ("exact", "4", "4.", False),
        ("exact", "4", "44", False),
        ("contains", "Paris", "It is Paris, of course.", True),
        ("contains", "Paris", "It is paris.", False),
        ("regex", r"\b(19|20)\d\d\b", "in 1969 it was", True),
        ("regex", r"\b(19|20)\d\d\b", "in 2150 or 19690", False),
        ("json", '{"a": 1, "b": [true]}', '{"b": [true], "a": 1}', True),
        ("json", '{"a": 1}', 'Sure! ```json\n{"a": 1}\n``` done', True),
        ("json", '{"a": 1}', 'first {"a": 2} then {"a": 1}', False),  # the first value counts
        ("json", '{"a": 1}', '{"a": true}', False),  # true is not 1
        ("json", '{"a": 1}', "{'a': 1}", False),  # not JSON
        ("json", "42", " 42 ", True),
        ("json", '"42"', "42", False),
    ],
)
def test_check_case(check, expected, output, passes):
    case = TestCase("c", "p", expected, check, [])
    assert check_case(case, output) is passes


def test_check_case_refuses_an_unknown_check():
    with pytest.raises(PipelineError, match="unknown check 'fuzzy'"):
        check_case(TestCase("c", "p", "x", "fuzzy", []), "x")


# --- refusals, each naming the line and the problem ----------------------------------------------


GOOD_CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        (
            [{"text": "a"}, {"prompt": "p", "completion": "c"}],
            "line 2 is a prompt_completion row but line 1 made this a text dataset",
        ),
        ([{"prompt": "p", "completion": "c"}, {"prompt": "p"}], "line 2 lacks 'completion'"),
        ([{"text": "a"}, {"text": "b", "id": 3}], "line 2 has key(s) 'id' that a text row"),
        ([{"sentence": "a"}], "line 1 has 'sentence', which is no text kind"),
        ([{"prompt": "only a prompt"}], "line 1 has 'prompt', which is no text kind"),
        ([{"text": "a"}, {"text": "   "}], "line 2: 'text' is empty"),
        ([{"text": "a"}, {"text": 5}], "line 2: 'text' is a number, not a string"),
        ([{"prompt": "p", "completion": ""}], "line 1: 'completion' is empty"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}],
            "line 1: message 2 has role 'bot'; roles are system, user, assistant",
        ),
        (
            [{"messages": GOOD_CHAT}, {"messages": [{"role": "user", "content": "hi"}]}],
            "line 2: the last message must be the assistant's",
        ),
        (
            [{"messages": [{"role": "assistant", "content": "x"}]}],
            "line 1: message 1 is 'assistant' but 'user' was expected",
        ),
        (
            [{"messages": [*GOOD_CHAT, {"role": "system", "content": "x"}]}],
            "line 1: message 3 is a system message: only the first may be one",
        ),
        ([{"messages": [{"role": "user", "text": "hi"}]}], "line 1: message 1 lacks ['content']"),
        ([{"messages": []}], "'messages' must be a non-empty list"),
        (
            [{"prompt": "p", "expected": "(unclosed", "check": "regex"}],
            "line 1: the regex pattern '(unclosed' is invalid",
        ),
        (
            [{"prompt": "p", "expected": "a" * 1001, "check": "regex"}],
            "over the 1000 limit",
        ),
        (
            [{"prompt": "p", "expected": "{not json", "check": "json"}],
            "line 1: 'expected' of a json check must be JSON text",
        ),
        ([{"prompt": "p", "expected": "x", "check": "fuzzy"}], "'check' is 'fuzzy'; checks are"),
        ([{"prompt": "p", "expected": "x"}], "line 1 lacks 'check'"),
        (
            [
                {"prompt": "p", "expected": "x", "check": "exact", "name": "a"},
                {"prompt": "q", "expected": "y", "check": "exact", "name": "a"},
            ],
            "line 2: test case name 'a' is already used on line 1",
        ),
        ([{"prompt": "p", "expected": "x", "check": "exact", "tags": "t"}], "'tags' must be"),
        ([{"text": "a"}, ["text", "b"]], "line 2 is a list, not an object"),
        ([{"text": "a"}, {"text": "\ud800"}], "line 2: 'text' is not UTF-8 text"),
    ],
)
def test_refusals_name_the_line_and_the_problem(tmp_path, rows, needle):
    assert needle in refusal(tmp_path, rows)


def test_a_line_that_is_not_utf8_is_refused(tmp_path):
    raw = b'{"text": "fine"}\n' + b'{"text": "caf\xe9"}\n'
    assert "line 2 is not UTF-8 text (byte 14 of the line is 0xe9)" in refusal(tmp_path, raw)


def test_an_over_long_line_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_text, "MAX_LINE_CHARS", 100)
    raw = b'{"text": "short"}\n{"text": "' + b"x" * 200 + b'"}\n'
    assert "line 2 of the JSON Lines file is longer than 100 bytes" in refusal(tmp_path, raw)


def test_too_many_rows_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(text_rows, "MAX_TEXT_ROWS", 5)
    assert "more than 5 rows" in refusal(tmp_path, TEXTS[:6])
    write_jsonl(tmp_path / "ok.jsonl", TEXTS[:5])
    assert inspect_dataset(tmp_path / "ok.jsonl", "ok.jsonl").rows == 5


def test_numeric_json_lines_are_still_tensor_datasets(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"x": [1.0, 2.0], "label": i % 2} for i in range(4)])
    info = inspect_dataset(path, "n.jsonl")
    assert "text_kind" not in info.schema and info.schema["columns"][0]["name"] == "x"
    # a numeric row with a text label keeps the tensor reader's advice
    message = refusal(tmp_path, [{"x": [1.0], "label": "cat"}])
    assert "encode class labels as integers" in message


# --- which datasets fit which models -------------------------------------------------------------


def test_text_datasets_fit_language_models_and_tensor_datasets_tensor_models(tmp_path):
    text = ref_for(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    numeric = ref_for(
        write_jsonl(tmp_path / "n.jsonl", [{"x": [1.0, 2.0], "label": i % 2} for i in range(4)])
    )
    specs = [TensorSpec("x", ["batch", 2], "float32")]
    check_fits(text, "hf_checkpoint", [])
    check_fits(text, "gguf", [])
    check_fits(numeric, "onnx", specs)
    with pytest.raises(PipelineError, match="holds numbers .jsonl.; a language model reads a text"):
        check_fits(numeric, "hf_checkpoint", [])
    with pytest.raises(PipelineError, match=r"is a text dataset \(text\); only language models"):
        check_fits(text, "onnx", specs)
    # the tensor rules still apply between tensor datasets and models
    with pytest.raises(PipelineError, match="takes"):
        check_fits(numeric, "onnx", [TensorSpec("x", ["batch", 3], "float32")])


def test_a_text_dataset_never_reaches_the_tensor_loader_quietly(tmp_path):
    ref = ref_for(write_jsonl(tmp_path / "t.jsonl", TEXTS))
    with pytest.raises(PipelineError, match="cannot be read"):
        load_split(ref, "test", [TensorSpec("x", ["batch", 2], "float32")])
    assert np.array_equal(split_indices(3, SPLITS, 0)["all"], np.arange(3))
