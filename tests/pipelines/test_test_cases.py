"""Test cases for tensor models (the certification's scenario level): reading and refusing the
file, feeding a case to a model, judging each check, and a whole suite run on real models."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import pipelines.datasets.tensor_cases as tensor_cases
from pipelines.certification.test_cases import (
    TestCase,
    check_fits,
    feeds_for,
    judge,
    judge_all,
    parse_test_cases,
)
from pipelines.core import DatasetRef, PipelineError, TensorSpec
from pipelines.datasets import check_fits as dataset_fits
from pipelines.datasets import inspect_dataset, load_split, text_kind
from pipelines.engines import load_engine
from pipelines.formats import RejectedUpload

from .conftest import ModelFile

X64 = [TensorSpec("x", ["batch", 64], "float32")]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a small shared CPU: one thread is faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write(path: Path, rows: list[object]) -> Path:
    """A JSON Lines file: dicts are dumped, strings written as they are (a broken line)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def case(check: str, expected: object, **fields: object) -> TestCase:
    """One case parsed through the real reader (so params get their defaults)."""
    row = {"name": "c", "input": [0.0], "expected": expected, "check": check, **fields}
    with tempfile.TemporaryDirectory() as folder:
        return parse_test_cases(write(Path(folder) / "case.jsonl", [row]))[0]


def out(*values: float) -> dict[str, np.ndarray]:
    """Model outputs for a batch of one: one output named "output"."""
    return {"output": np.array([values], dtype=np.float32)}


# --- reading the file ---------------------------------------------------------------------------


def test_it_reads_the_documented_rows_with_their_defaults(tmp_path: Path) -> None:
    rows = [
        {"name": "fraud-001", "inputs": {"x": [[0.1, 0.2], [0.3, 0.4]]}, "expected": 1,
         "check": "argmax", "tags": ["fraud", "must"]},
        {"name": "scan-7", "inputs": {"x": [0.5, 0.25, 0.0]}, "expected": [0.1, 0.9],
         "check": "within", "atol": 0.01, "rtol": 0.0},
        {"name": "emb-3", "inputs": {"x": [1, 2, 3]}, "expected": [0.2, 0.4], "check": "cosine",
         "output": "embedding", "description": "an embedding"},
        {"name": "top-2", "inputs": {"x": [1, 2]}, "expected": 3, "check": "top_k"},
        "",
        {"name": "exact", "inputs": {"x": [1]}, "expected": [0, 1, 1], "check": "equals"},
    ]  # fmt: skip

    cases = parse_test_cases(write(tmp_path / "cases.jsonl", rows))

    assert [c.name for c in cases] == ["fraud-001", "scan-7", "emb-3", "top-2", "exact"]
    fraud, scan, emb, top, exact = cases
    assert isinstance(fraud.inputs, dict) and fraud.inputs["x"].shape == (2, 2)
    assert fraud.tags == ("fraud", "must") and fraud.expected.shape == ()
    assert scan.params == {"atol": 0.01, "rtol": 0.0}
    assert emb.params == {"min_cosine": 0.99} and emb.output == "embedding"
    assert emb.description == "an embedding"
    assert top.params == {"k": 5} and top.tags == ()
    assert exact.expected.dtype == np.int64 and exact.expected.tolist() == [0, 1, 1]


def test_a_one_input_case_is_one_array(tmp_path: Path) -> None:
    row = {"name": "a", "input": [0.5, 0.25, 0.0], "expected": [0.1], "check": "equals"}
    (got,) = parse_test_cases(write(tmp_path / "c.jsonl", [row]))
    assert isinstance(got.inputs, np.ndarray) and got.inputs.tolist() == [0.5, 0.25, 0.0]
    assert got.input_names == ["input"]


GOOD = {"name": "a", "input": [1.0, 2.0], "expected": 1, "check": "argmax"}


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([GOOD, '{"name": "b", "input": [1'], "line 2 is not valid JSON"),
        ([GOOD, "", '{"name": "b", "input": [NaN], "expected": 1, "check": "argmax"}'],
         "line 3 is not valid JSON: NaN is not a finite number"),
        (['{"name": "a", "input": [1e400], "expected": 1, "check": "argmax"}'],
         "line 1: 'input': only finite numbers"),
        ([{**GOOD, "check": "close"}], "line 1: 'check' is 'close'; checks are equals"),
        ([{**GOOD, "check": "exact"}], "'exact' is a language model's check"),
        ([{k: v for k, v in GOOD.items() if k != "expected"}], "line 1: lacks 'expected'"),
        ([{k: v for k, v in GOOD.items() if k != "input"}], "line 1: lacks 'inputs' (or 'input'"),
        ([{**GOOD, "inputs": {"x": [1]}}], "has both 'input' and 'inputs'"),
        ([{**GOOD, "labels": [1]}], "line 1: has key(s) 'labels' that a test case does not use"),
        ([GOOD, {**GOOD, "name": "b"}, GOOD],
         "line 3: test case name 'a' is already used on line 1"),
        ([{**GOOD, "name": " "}], "line 1: 'name' must be a non-empty string"),
        ([{**GOOD, "name": "n" * 201}], "'name' is longer than 200 characters"),
        ([{**GOOD, "input": ["a", 1]}], "line 1: 'input': text ('a')"),
        ([{**GOOD, "input": [True]}], "line 1: 'input': true is not a number"),
        ([{**GOOD, "input": [[1, 2], [3]]}], "line 1: 'input': a ragged list"),
        ([{**GOOD, "expected": "1"}], "line 1: 'expected': text"),
        ([GOOD, {"name": "b", "inputs": {"x": [1.0]}, "expected": 1, "check": "argmax"}],
         "line 2 feeds ['x'] but line 1 feeds ['input']"),
        ([{**GOOD, "expected": 1.5}], "class index (a whole number >= 0)"),
        ([{**GOOD, "expected": -1}], "class index"),
        ([{**GOOD, "k": 3}], "'k' is no setting of the argmax check"),
        ([{**GOOD, "check": "within", "expected": [1.0]}], "needs 'atol' and/or 'rtol'"),
        ([{**GOOD, "check": "within", "expected": [1.0], "atol": -0.1}], "must be >= 0"),
        ([{**GOOD, "check": "within", "expected": [1.0], "rtol": "0.1"}], "must be a number"),
        ([{**GOOD, "check": "top_k", "k": 0}], "'k' must be a whole number >= 1"),
        ([{**GOOD, "check": "top_k", "expected": [0, 1]}], "top_k check must be a class index"),
        ([{**GOOD, "check": "cosine", "expected": [1], "min_cosine": 1.5}], "in (-1, 1]"),
        ([{**GOOD, "check": "cosine", "expected": [0, 0]}], "all zeros"),
        ([{**GOOD, "tags": "must"}], "'tags' must be a list"),
        ([{"name": "a", "inputs": {}, "expected": 1, "check": "argmax"}],
         "line 1: 'inputs' must be an object"),
        (["[1, 2]"], "line 1 is not a JSON object"),
        ([""], "the file has no test cases"),
    ],
)  # fmt: skip
def test_it_refuses_a_bad_file_naming_the_line(
    tmp_path: Path, rows: list[object], needle: str
) -> None:
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RejectedUpload) as refused:
        parse_test_cases(path)
    assert needle in refused.value.message


def test_it_refuses_more_cases_than_the_limit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tensor_cases, "MAX_CASES", 3)
    path = write(tmp_path / "many.jsonl", [{**GOOD, "name": f"c{i}"} for i in range(4)])
    with pytest.raises(RejectedUpload, match="more than 3 test cases") as refused:
        parse_test_cases(path)
    assert refused.value.code == "too_large"
    assert len(parse_test_cases(write(tmp_path / "ok.jsonl", [GOOD]))) == 1


def test_it_refuses_a_file_over_the_size_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "big.jsonl", [GOOD])
    with pytest.raises(RejectedUpload, match="over the 10-byte limit"):
        parse_test_cases(path, max_bytes=10)


def test_a_text_test_case_is_not_taken_for_a_tensor_one(tmp_path: Path) -> None:
    text = write(tmp_path / "t.jsonl", [{"prompt": "2+2=", "expected": "4", "check": "exact"}])
    tensor = write(tmp_path / "n.jsonl", [GOOD])

    assert inspect_dataset(text, "t.jsonl").schema["text_kind"] == "test_cases"
    info = inspect_dataset(tensor, "n.jsonl")
    assert (info.format, info.rows) == ("jsonl", 1)
    assert info.schema == {
        "test_cases": {"count": 1, "checks": {"argmax": 1}, "tags": {}, "inputs": ["input"]}
    }


def test_a_test_case_dataset_feeds_no_stage_and_no_language_model(tmp_path: Path) -> None:
    path = write(tmp_path / "n.jsonl", [GOOD])
    info = inspect_dataset(path, "n.jsonl")
    ref = DatasetRef(id="7", path=str(path), format="jsonl", schema=info.schema)

    assert text_kind(ref) is None
    with pytest.raises(PipelineError, match="dataset 7 holds test cases"):
        dataset_fits(ref, "onnx", X64)
    with pytest.raises(PipelineError, match="dataset 7 holds test cases"):
        load_split(ref, "train", X64)
    with pytest.raises(PipelineError, match="tensor model's test cases"):
        dataset_fits(ref, "hf_checkpoint", [])


# --- judging each check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "outputs", "passed", "got"),
    [
        (case("equals", [0, 1, 1]), out(0, 1, 1), True, {"max_error": 0.0}),
        (case("equals", [0, 1, 1]), out(0, 1, 2), False, {"max_error": 1.0}),
        (case("argmax", 1), out(0.1, 0.7, 0.2), True, {"argmax": 1}),
        (case("argmax", 2), out(0.1, 0.7, 0.2), False, {"argmax": 1}),
        (case("argmax", [0.2, 0.5, 0.3]), out(0.1, 0.7, 0.2), True, {"argmax": 1}),
        (case("argmax", [0.0, 0.0, 1.0]), out(0.1, 0.7, 0.2), False, {"argmax": 1}),
        (case("within", [0.1, 0.9], atol=0.01), out(0.105, 0.895), True, {}),
        (case("within", [0.1, 0.9], atol=0.01), out(0.125, 0.9), False, {}),
        (case("within", [100, 200], rtol=0.01), out(100.9, 201.9), True, {}),
        (case("within", [100, 200], rtol=0.01), out(102, 200), False, {}),
        (case("top_k", 2, k=2), out(0.1, 0.5, 0.3, 0.05), True, {"top_k": [1, 2]}),
        (case("top_k", 0, k=2), out(0.1, 0.5, 0.3, 0.05), False, {"top_k": [1, 2]}),
        (case("top_k", 3), out(0.1, 0.5, 0.3, 0.05), True, {"top_k": [1, 2, 0, 3]}),
        (case("cosine", [0.2, 0.4]), out(0.1, 0.2), True, {"cosine": pytest.approx(1.0)}),
        (case("cosine", [0.2, 0.4]), out(0.4, -0.2), False, {"cosine": pytest.approx(0.0)}),
        (case("cosine", [1, 1], min_cosine=0.7), out(1, 0), True, {}),
        (case("cosine", [1, 1], min_cosine=0.8), out(1, 0), False, {}),
    ],
)
def test_each_check_passes_and_fails_on_real_numbers(
    given: TestCase, outputs: dict[str, np.ndarray], passed: bool, got: dict[str, object]
) -> None:
    result = judge(given, outputs)

    assert result.passed is passed, result.reason
    assert got.items() <= result.got.items()
    assert result.got["output"] == "output" and result.got["shape"] == [outputs["output"].size]
    assert result.got["values"] == pytest.approx(outputs["output"][0].tolist())
    assert result.reason and result.check == given.check


def test_within_reports_the_largest_error() -> None:
    result = judge(case("within", [0.1, 0.9], atol=0.01), out(0.125, 0.9))
    assert result.got["max_error"] == pytest.approx(0.025, abs=1e-6)
    assert "atol 0.01" in result.reason


def test_a_nan_output_fails_and_its_summary_stays_json_safe() -> None:
    for given in (case("within", [1.0, 2.0], atol=1.0), case("argmax", 0)):
        result = judge(given, out(float("nan"), 2.0))
        assert not result.passed
        assert result.got.get("max_error") is None and result.got["values"] == [None, 2.0]
        json.dumps(result.got, allow_nan=False)  # raises on NaN


def test_it_judges_the_named_output_and_fails_one_the_model_lacks() -> None:
    outputs = {"logits": np.array([[5.0, 1.0]]), "embedding": np.array([[0.1, 0.2]])}

    named = judge(case("cosine", [0.2, 0.4], output="embedding"), outputs)
    first = judge(case("argmax", 0), outputs)
    missing = judge(case("argmax", 0, output="probs"), outputs)

    assert named.passed and named.got["output"] == "embedding"
    assert first.passed and first.got["output"] == "logits"
    assert not missing.passed and "no output 'probs'" in missing.reason


def test_it_shows_at_most_sixteen_values_of_the_output() -> None:
    result = judge(case("argmax", 49), {"output": np.arange(50.0)[None]})
    assert result.passed and result.got["values"] == list(range(16))
    too_far = judge(case("argmax", 60), {"output": np.arange(50.0)[None]})
    assert not too_far.passed and "out of range" in too_far.reason


# --- feeding a case to a model ------------------------------------------------------------------


def test_feeds_are_a_batch_of_one_reshaped_and_cast_to_the_input() -> None:
    image = [TensorSpec("image", ["batch", 1, 8, 8], "float32")]
    flat = case("argmax", 0, input=list(range(64)))

    feeds = feeds_for(flat, image)

    assert feeds["image"].shape == (1, 1, 8, 8) and feeds["image"].dtype == np.float32
    assert feeds["image"].ravel().tolist() == list(range(64))
    ids = feeds_for(case("argmax", 0, input=[1.0, 2.0]), [TensorSpec("ids", [1, "n"], "int64")])
    assert ids["ids"].dtype == np.int64 and ids["ids"].tolist() == [[1, 2]]


def test_a_case_that_does_not_fit_the_model_is_refused_with_its_name(tmp_path: Path) -> None:
    two = [TensorSpec("a", ["batch", 16], "float32"), TensorSpec("b", ["batch", 16], "float32")]
    short = case("argmax", 0, input=[0.0] * 63)

    with pytest.raises(PipelineError, match=r"test case 'c' gives input 'x' 63 value\(s\)"):
        feeds_for(short, X64)
    with pytest.raises(PipelineError, match="test case 'c' has one 'input' but the model takes 2"):
        feeds_for(case("argmax", 0, input=[0.0] * 16), two)
    with pytest.raises(PipelineError, match="takes int64 but the case gives fractional"):
        feeds_for(case("argmax", 0, input=[0.5]), [TensorSpec("ids", ["batch", 1], "int64")])
    rows = [{"name": "ab", "inputs": {"a": [0.0] * 16}, "expected": 0, "check": "argmax"}]
    (only_a,) = parse_test_cases(write(tmp_path / "a.jsonl", rows))
    with pytest.raises(PipelineError, match=r"'ab' feeds inputs \['a'\] but the model takes"):
        feeds_for(only_a, two)

    fits = case("argmax", 0, input=[0.0] * 64)
    check_fits([fits], X64)
    with pytest.raises(PipelineError, match="test case 'c'"):
        check_fits([fits, short], X64)


# --- a whole suite on real models ---------------------------------------------------------------


def test_judge_all_runs_an_onnx_model_and_counts_must_and_tags(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    engine = load_engine(onnx_mlp.fresh_artifact(), device="cpu")
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((4, 64)).astype(np.float32)
    with torch.inference_mode():
        logits = onnx_mlp.module(torch.from_numpy(samples)).numpy()
    right, wrong = int(np.argmax(logits[0])), (int(np.argmax(logits[1])) + 1) % 10
    second = int(np.argsort(-logits[2])[1])
    rows = [
        {"name": "right", "input": samples[0].tolist(), "expected": right, "check": "argmax",
         "tags": ["must", "fraud"]},
        {"name": "wrong", "input": samples[1].tolist(), "expected": wrong, "check": "argmax",
         "tags": ["must"]},
        {"name": "top2", "input": samples[2].tolist(), "expected": second, "check": "top_k",
         "k": 2, "tags": ["fraud"]},
        {"name": "close", "input": samples[3].tolist(), "expected": logits[3].tolist(),
         "check": "within", "atol": 1e-4, "rtol": 1e-4},
        {"name": "cos", "input": samples[3].tolist(), "expected": logits[3].tolist(),
         "check": "cosine", "min_cosine": 0.9999},
        {"name": "boom", "input": [42.0] * 64, "expected": 0, "check": "argmax",
         "tags": ["must"]},
        {"name": "short", "input": [0.0] * 63, "expected": 0, "check": "argmax"},
    ]  # fmt: skip
    cases = parse_test_cases(write(tmp_path / "suite.jsonl", rows))

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if feeds["x"][0, 0] == 42.0:
            raise RuntimeError("the device fell over")
        return engine.run(feeds)

    report = judge_all(cases, run, engine.inputs)

    verdicts = {r.name: r.passed for r in report.results}
    assert verdicts == {
        "right": True, "wrong": False, "top2": True, "close": True, "cos": True,
        "boom": False, "short": False,
    }  # fmt: skip
    by_name = {r.name: r for r in report.results}
    assert by_name["boom"].reason == "the device fell over"
    assert "63 value(s)" in by_name["short"].reason
    assert by_name["top2"].got["top_k"][1] == second
    assert by_name["close"].got["max_error"] < 1e-4
    assert report.pass_rate == pytest.approx(4 / 7)
    assert (report.must_total, report.must_passed) == (3, 1)
    assert report.by_tag == {"must": (1, 3), "fraud": (2, 2)}
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["by_tag"]["must"] == [1, 3] and len(data["results"]) == 7


def test_a_torchscript_model_takes_cases_shaped_like_its_input(
    ts_cnn: ModelFile, tmp_path: Path
) -> None:
    engine = load_engine(ts_cnn.fresh_artifact(), device="cpu")
    image = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    with torch.inference_mode():
        logits = ts_cnn.module(torch.from_numpy(image[None])).numpy()[0]
    rows = [
        {"name": "img", "inputs": {"image": image.tolist()}, "expected": logits.tolist(),
         "check": "argmax"},
        {"name": "flat", "inputs": {"image": image.ravel().tolist()},
         "expected": logits.tolist(), "check": "within", "atol": 1e-5},
    ]  # fmt: skip
    cases = parse_test_cases(write(tmp_path / "cnn.jsonl", rows))

    check_fits(cases, engine.inputs)
    report = judge_all(cases, engine.run, engine.inputs)

    assert [r.passed for r in report.results] == [True, True]
    assert report.results[0].got["argmax"] == int(np.argmax(logits))
    assert report.pass_rate == 1.0 and report.must_total == 0
