"""The certification suite of a language model, on tiny random Llamas, without a serving process
(as ``python -m pipelines`` runs it): every check that judges the model itself, each shown to
fail on a model that breaks it. The checks through the serving process are tested with the
platform (tests/test_certify_text.py)."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.certification._text_serving import finish_consistent, stop_honoured
from pipelines.certification.profiles import compatibility_problem, detect_profiles
from pipelines.certification.text_load_client import connection, stream_completion
from pipelines.core import Artifact, DatasetRef, PipelineContext, PipelineError
from pipelines.llm.agreement import greedy_agreement
from pipelines.llm.runtime import open_text_model
from pipelines.stages.certify import Certify
from tests.text_models import ascii_llama, copy_model, edit_head, lowercasing_tokenizer

CASES = "5"
# Fewer golden texts, prompts and tokens than the defaults: every check still runs on each.
QUICK = {"golden_rows": 4, "text_prompts": 3, "text_new_tokens": 24}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("certify-text")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    return ascii_llama(root / "llama")


def _torch_profile():
    return next(p for p in detect_profiles() if p.backend == "torch" and p.device_kind == "cpu")


def _artifact(folder: Path, precision: str = "fp32", key: str = "input", parent=None) -> Artifact:
    return Artifact(key, str(folder), "hf_checkpoint", precision, [], [], parent=parent)


def _certify(
    tmp_path: Path,
    model: Artifact,
    reference: Artifact | None = None,
    level: str = "basic",
    datasets: dict[str, DatasetRef] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """The report of the certify stage on ``model`` (made from ``reference``, when given)."""
    ctx = PipelineContext.start(tmp_path / "work", reference or model, datasets=datasets)
    ctx.workdir.mkdir(parents=True)
    if reference is not None:
        ctx.add_artifact(model)
    stage_settings = {"profile": _torch_profile().key, "level": level, **QUICK, **settings}
    result = Certify().run(ctx, "02-certify", stage_settings, lambda fraction, message: None)
    return result.details


def _checks(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in report["checks"]}


def _measured(check: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in check["measurements"]}


def test_it_certifies_a_checkpoint_on_its_own_checks_without_a_serving_process(tmp_path, llama):
    report = _certify(tmp_path, _artifact(llama))
    checks = _checks(report)
    assert report["family"] == "text-generation" and report["suite_version"] == "text-1.0.0"
    assert list(checks) == [
        "loads", "tokenizer", "parity", "finite", "determinism", "stops", "context",
        "api_success", "performance", "serving", "qps", "scenario",
    ]  # fmt: skip
    verdicts = {name: c["verdict"] for name, c in checks.items()}
    assert verdicts == {
        "loads": "pass", "tokenizer": "pass", "parity": "not_run", "finite": "pass",
        "determinism": "pass", "stops": "pass", "context": "pass", "api_success": "not_run",
        "performance": "not_run", "serving": "not_run", "qps": "not_run", "scenario": "not_run",
    }, {name: c["summary"] for name, c in checks.items()}  # fmt: skip
    assert report["verdict"] == "passed"
    # The fp32 upload is its own reference; without a serving process, the API is not judged.
    assert "reference itself" in checks["parity"]["summary"]
    assert "no serving runtime" in checks["api_success"]["summary"]
    context = _measured(checks["context"])
    assert context["engine_refuses_over_context"]["value"] is True
    assert context["context_length"]["value"] == 128
    assert _measured(checks["tokenizer"])["roundtrip_rate"]["value"] == 1.0
    assert _measured(checks["stops"])["eos_declared"]["value"] is True
    # The report records the thresholds a language model is judged by, none of a tensor model's.
    assert "max_ppl_increase" in report["thresholds"] and "qps_seconds" not in report["thresholds"]
    assert [(c["level"], c["verdict"]) for c in report["criteria"]] == [
        ("basic", "not_run"), ("performance", "not_run"), ("scenario", "not_run"),
    ]  # fmt: skip
    assert report["criteria"][1]["title"].startswith("Output tokens/s per card")


def test_parity_fails_a_model_whose_perplexity_rose_and_passes_a_faithful_copy(
    tmp_path, root, llama
):
    reference = _artifact(llama)
    faithful = copy_model(llama, root / "faithful")
    report = _certify(
        tmp_path / "a", _artifact(faithful, "bf16", "01-copy", "input"), reference=reference
    )
    parity = _checks(report)["parity"]
    assert parity["verdict"] == "pass", parity["summary"]
    measured = _measured(parity)
    assert measured["ppl_increase"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert measured["greedy_agreement"]["value"] == 1.0
    assert report["reference"]["precision"] == "fp32"

    # Logits four times as sharp: the same greedy tokens, but confidently wrong probabilities.
    sharper = edit_head(copy_model(llama, root / "sharper"), lambda head, _: head.mul_(4.0))
    report = _certify(
        tmp_path / "b", _artifact(sharper, "int8", "01-int8", "input"), reference=reference
    )
    parity = _checks(report)["parity"]
    measured = _measured(parity)
    assert parity["verdict"] == "fail" and report["verdict"] == "failed"
    assert measured["ppl_increase"]["passed"] is False
    assert measured["ppl_increase"]["value"] > 0.02
    assert measured["greedy_agreement"]["passed"] is True  # argmax untouched: only ppl says it
    assert measured["perplexity"]["value"] > measured["reference.perplexity"]["value"]


def test_a_quantized_model_without_a_full_precision_ancestor_fails_parity(tmp_path, llama):
    parity = _checks(_certify(tmp_path, _artifact(llama, "int8")))["parity"]
    assert parity["verdict"] == "fail"
    assert "no full-precision ancestor" in parity["summary"]


def test_nan_in_the_logits_fails_finite(tmp_path, root, llama):
    def poison(head, tokenizer) -> None:
        head[tokenizer.encode(" the")[0]] = float("nan")

    broken = edit_head(copy_model(llama, root / "nan"), poison)
    report = _certify(tmp_path, _artifact(broken))
    finite = _checks(report)["finite"]
    assert finite["verdict"] == "fail" and report["verdict"] == "failed"
    measured = _measured(finite)
    assert measured["nonfinite_values"]["value"] > 0
    assert measured["sequences_with_nonfinite"]["passed"] is False


def test_a_tokenizer_that_changes_text_fails_the_round_trip(tmp_path, root, llama):
    lowered = lowercasing_tokenizer(copy_model(llama, root / "lower"))
    tokenizer = _checks(_certify(tmp_path, _artifact(lowered)))["tokenizer"]
    assert tokenizer["verdict"] == "fail"
    assert _measured(tokenizer)["roundtrip_rate"]["value"] < 1.0
    # The built-in sample's capitals came back lowercased.
    assert any(f["got"] == f["text"].lower() for f in tokenizer["details"]["failed"])


def test_the_scenario_judges_text_test_cases_and_must_cases(tmp_path, llama):
    with open_text_model(_artifact(llama), threads=1) as model:
        prompt = "the quick brown fox"
        made = model.generate([model.encode(prompt)], QUICK["text_new_tokens"])[0]
        expected = model.decode(made.tokens)
    rows = [
        {"name": "echo", "prompt": prompt, "expected": expected, "check": "exact"},
        {"name": "json", "prompt": "0 1 2 3", "expected": '{"never": true}', "check": "json",
         "tags": ["must"]},
        {"name": "word", "prompt": "a language model", "expected": "zzz", "check": "contains"},
    ]  # fmt: skip
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cases = DatasetRef(CASES, str(path), "jsonl", schema={"text_kind": "test_cases"})
    report = _certify(
        tmp_path,
        _artifact(llama),
        level="scenario",
        datasets={CASES: cases},
        test_cases_dataset_id=int(CASES),
        scenario_min_pass_rate=0.3,
    )
    scenario = _checks(report)["scenario"]
    measured = _measured(scenario)
    # One case of three passes (1/3 >= 0.3), but the must case failed: the scenario fails.
    assert measured["pass_rate"]["value"] == pytest.approx(1 / 3, abs=1e-5)
    assert measured["pass_rate"]["passed"] is True
    assert measured["must_passed"]["value"] == 0 and measured["must_passed"]["passed"] is False
    assert scenario["verdict"] == "fail"
    assert [c["name"] for c in scenario["details"]["test_cases"]["failed"]] == ["json", "word"]
    assert report["criteria"][2]["value"] == pytest.approx(1 / 3, abs=1e-5)


def test_the_scenario_level_of_a_language_model_needs_test_cases(tmp_path, llama):
    path = tmp_path / "texts.jsonl"
    path.write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog"}) + "\n")
    golden = DatasetRef("4", str(path), "jsonl", schema={"text_kind": "text"})
    with pytest.raises(PipelineError, match="test_cases_dataset_id"):
        _certify(
            tmp_path, _artifact(llama), level="scenario", datasets={"4": golden},
            golden_dataset_id=4,
        )  # fmt: skip


def test_language_models_are_certified_on_cpu_profiles_of_their_runtime():
    cpu = _torch_profile()
    assert compatibility_problem(cpu, "hf_checkpoint") is None
    assert compatibility_problem(cpu, "lora_adapter") is None
    assert "onnxruntime" in (compatibility_problem(cpu, "ort_genai") or "")
    gpu = dataclasses.replace(cpu, device_kind="cuda")
    assert "CPU" in (compatibility_problem(gpu, "hf_checkpoint") or "")


def test_greedy_agreement_stops_and_finish_reasons_are_judged_as_documented():
    assert greedy_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]], 64) == (0.75, 2.0)
    assert greedy_agreement([[1, 2]], [[1, 2, 3, 4]], 64) == (0.5, 2.0)  # stopped early: differs
    assert stop_honoured("hello world", "wo", "hello ", "stop")
    assert not stop_honoured("hello world", "wo", "hello wo", "stop")  # the stop string leaked
    assert not stop_honoured("hello world", "wo", "hello ", "length")
    assert finish_consistent("length", 32, 32) and finish_consistent("stop", 5, 32)
    assert not finish_consistent("length", 5, 32) and not finish_consistent(None, 5, 32)


class _Streams(http.server.BaseHTTPRequestHandler):
    """Answers POST /v1/completions with the stream its prompt names."""

    protocol_version = "HTTP/1.1"
    STREAMS = {
        "ok": [b'{"choices":[{"text":"hi","finish_reason":null}]}',
               b'{"choices":[{"text":" there","finish_reason":"length"}]}',
               b'{"choices":[],"usage":{"completion_tokens":2}}', b"[DONE]"],
        "replacement": [b'{"choices":[{"text":"caf\\ufffd","finish_reason":"stop"}]}', b"[DONE]"],
        "no_finish": [b'{"choices":[{"text":"hi","finish_reason":null}]}', b"[DONE]"],
        "error": [b'{"choices":[{"text":"hi","finish_reason":null}]}',
                  b'{"error":{"message":"NaN in the logits"}}', b"[DONE]"],
        "cut": [b'{"choices":[{"text":"hi","finish_reason":null}]}'],
        "bad_json": [b"{not json", b"[DONE]"],
    }  # fmt: skip

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "refused":
            data = b'{"error":{"message":"too long","code":"context_length_exceeded"}}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            for event in self.STREAMS[body["prompt"]]:
                data = b"data: " + event + b"\n\n"
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if body["prompt"] != "cut":
                self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up on a broken stream, as it should
            pass

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def streams() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Streams)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_streaming_client_tells_successes_decode_failures_and_refusals(streams):
    def send(prompt: str):
        conn = connection(streams)
        try:
            return stream_completion(conn, {}, {"model": "m", "prompt": prompt, "max_tokens": 2})
        finally:
            conn.close()

    ok = send("ok")
    assert ok.cause == "" and ok.text == "hi there" and ok.tokens == 2
    assert ok.finish_reason == "length" and ok.ttft is not None and ok.tpot is not None
    for prompt, words in (
        ("replacement", "U+FFFD"),
        ("no_finish", "finish_reason missing"),
        ("error", "stream error: NaN in the logits"),
        ("cut", "without [DONE]"),
        ("bad_json", "not JSON"),
    ):
        found = send(prompt)
        assert found.decode_failure and words in found.cause, (prompt, found)
    refused = send("refused")
    assert refused.status == 400 and not refused.decode_failure
    assert refused.error_code == "context_length_exceeded"


def test_a_model_folder_that_changed_since_it_was_recorded_is_not_certified(tmp_path, llama):
    model = _artifact(llama)
    model.meta["sha256"] = "0" * 64  # what the registry would hold for another file
    with pytest.raises(PipelineError, match="does not match the sha256 recorded"):
        _certify(tmp_path, model)
