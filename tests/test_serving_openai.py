"""The OpenAI-compatible routes over real HTTP, a tiny random Llama decoded by transformers'
continuous batching (a real engine), from a static model list (no database)."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from pipelines.core import Artifact
from pipelines.llm.runtime import open_text_model
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import ModelSpec, StaticModelSource
from tests.llm_fixtures import CONTEXT, tiny_llama

TEAM_A, TEAM_B = 1, 2
A = {"Authorization": "Bearer token-a"}
B = {"Authorization": "Bearer token-b"}
METRICS = {"Authorization": "Bearer scrape"}
PROMPT = "the quick brown fox"


def text_spec(team: int, name: str, folder: Path, version: int = 1, fmt="hf_checkpoint", **kw):
    artifact = Artifact(
        key=f"{name} v{version}",
        path=str(folder),
        format=fmt,
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    return ModelSpec(
        team_id=team, team=f"team-{team}", name=name, version=version, artifact=artifact, **kw
    )


def without_chat_template(folder: Path) -> Path:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def served(tmp_path_factory, llama, mlp_onnx):
    plain = without_chat_template(tiny_llama(tmp_path_factory.mktemp("plain") / "model"))
    models = [
        text_spec(TEAM_A, "llm", llama, max_batch_size=16),
        text_spec(TEAM_A, "plain", plain),
        text_spec(TEAM_A, "mlp", mlp_onnx, fmt="onnx"),
        text_spec(TEAM_B, "llm", llama),
    ]
    source = StaticModelSource(models, {"token-a": TEAM_A, "token-b": TEAM_B})
    app = build_app(source, ServingOptions(poll_seconds=0.2, metrics_token="scrape"))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        yield url, app, source, models


@pytest.fixture(scope="module")
def reference(llama):
    """The same checkpoint decoded greedily by the platform's own loop."""
    return open_text_model(Artifact("ref", str(llama), "hf_checkpoint", "fp32", [], []), threads=1)


def post(url: str, route: str, body: dict, headers=A, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60, **kw)


def events(response: requests.Response) -> list:
    """The server-sent events' payloads ("[DONE]" kept as a string)."""
    found = []
    for line in response.iter_lines():
        if line:
            assert line.startswith(b"data: ")
            data = line[len(b"data: ") :].decode()
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def metric(url: str, name: str, labels: str) -> float:
    page = requests.get(f"{url}/metrics", headers=METRICS, timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", page, re.M)
    return float(match.group(1)) if match else 0.0


def greedy(reference, prompt_ids: list[int], new: int) -> tuple[str, int, str]:
    """Text, generated token count (an end-of-sequence token counted) and finish reason."""
    generation = reference.generate([prompt_ids], new)[0]
    count = len(generation.tokens) + int(generation.stopped_at_eos)
    finish = "stop" if generation.stopped_at_eos else "length"
    return reference.decode(generation.tokens), count, finish


def test_it_completes_as_greedy_decoding_does(served, reference):
    url = served[0]
    ids = reference.encode(PROMPT)
    text, count, finish = greedy(reference, ids, 12)
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    answer = post(url, "completions", body).json()
    assert answer["object"] == "text_completion" and answer["model"] == "llm"
    assert answer["choices"][0]["text"] == text
    assert answer["choices"][0]["finish_reason"] == finish
    assert answer["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": count,
        "total_tokens": len(ids) + count,
    }


def test_it_streams_a_completion_with_usage(served, reference):
    url = served[0]
    ids = reference.encode(PROMPT)
    text, count, finish = greedy(reference, ids, 12)
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    response = post(url, "completions", body, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(response)
    assert found[-1] == "[DONE]"
    chunks, last = found[:-2], found[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == count
    assert last["usage"]["prompt_tokens"] == len(ids)


def test_it_answers_chat_through_the_template(served, reference):
    url = served[0]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    rendered = reference.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    ids = reference.tokenizer.encode(rendered, add_special_tokens=False)
    text, count, _ = greedy(reference, ids, 10)
    body = {"model": "llm", "messages": messages, "max_tokens": 10, "temperature": 0}
    answer = post(url, "chat/completions", body).json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert answer["usage"]["prompt_tokens"] == len(ids)
    assert answer["usage"]["completion_tokens"] == count
    found = events(post(url, "chat/completions", body | {"stream": True}, stream=True))
    assert found[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert found[0]["object"] == "chat.completion.chunk"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in found[1:-1])
    assert streamed == text and found[-1] == "[DONE]"


def test_it_cuts_the_text_at_a_stop_string(served, reference):
    url = served[0]
    full, _, _ = greedy(reference, reference.encode(PROMPT), 30)
    start = next(
        k
        for k in range(1, len(full) - 1)
        if "\ufffd" not in full[k : k + 2] and full.find(full[k : k + 2]) == k
    )
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    answer = post(url, "completions", body | {"stop": ["\x00never", full[start : start + 2]]})
    choice = answer.json()["choices"][0]
    assert choice["text"] == full[:start]
    assert choice["finish_reason"] == "stop"


def test_it_stops_at_max_tokens_with_finish_length(served):
    url = served[0]
    body = {"model": "llm", "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 1.0}
    answer = post(url, "completions", body).json()
    assert answer["usage"]["completion_tokens"] == 1
    assert answer["choices"][0]["finish_reason"] in {"length", "stop"}  # stop: it drew the EOS


def test_it_refuses_a_seed_it_cannot_honour_and_is_reproducible_greedily(served):
    url = served[0]
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 8, "seed": 3}
    refused = post(url, "completions", body | {"temperature": 0.8})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "seed"
    first = post(url, "completions", body | {"temperature": 0}).json()
    second = post(url, "completions", body | {"temperature": 0}).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_eight_streams_are_decoded_together(served):
    url = served[0]
    labels = 'model="team-1/llm"'
    before = metric(url, "r1_serving_decode_batch_size_bucket", labels + ',le="1.0"')
    total_before = metric(url, "r1_serving_decode_batch_size_count", labels)
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 40, "stream": True, "top_p": 0.9}

    def one(i: int) -> list:
        return events(post(url, "completions", body | {"temperature": 0.5 + i / 10}, stream=True))

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert all(r[-1] == "[DONE]" and r[-2]["choices"][0]["finish_reason"] for r in results)
    ones = metric(url, "r1_serving_decode_batch_size_bucket", labels + ',le="1.0"') - before
    total = metric(url, "r1_serving_decode_batch_size_count", labels) - total_before
    assert total >= 8 and ones < total  # some tokens came from batches of more than one request


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("completions", {"prompt": "fox " * CONTEXT}, "prompt"),
        ("completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ("completions", {"prompt": PROMPT, "max_tokens": CONTEXT}, "max_tokens"),
        ("completions", {"prompt": PROMPT, "logprobs": 2, "echo": True}, "echo"),
        ("completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
        ("completions", {"prompt": PROMPT, "n": 2}, "n"),
        ("completions", {"prompt": PROMPT, "stop": 3}, "stop"),
        ("completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, None),
        ("completions", {"prompt": [5, 100000]}, "prompt"),
        ("chat/completions", {"messages": [{"content": "hi"}]}, "messages[0]"),
        ("chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0]"),
        ("chat/completions", {"messages": "hi"}, "messages"),
        ("chat/completions", {"messages": []}, "messages"),
    ],
)
def test_it_refuses_bad_input_with_openai_errors(served, route, body, param):
    answer = post(served[0], route, {"model": "llm"} | body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


def test_it_refuses_chat_without_a_template_and_bad_json(served):
    url = served[0]
    messages = [{"role": "user", "content": "hi"}]
    answer = post(url, "chat/completions", {"model": "plain", "messages": messages})
    assert answer.status_code == 400 and "chat template" in answer.json()["error"]["message"]
    raw = requests.post(f"{url}/v1/completions", data=b"{not json", headers=A, timeout=10)
    assert raw.status_code == 400 and "error" in raw.json()
    tensor = post(url, "completions", {"model": "mlp", "prompt": PROMPT})
    assert tensor.status_code == 400


def test_a_client_that_disconnects_is_cancelled_in_the_engine(served, reference):
    url, app = served[0], served[1]
    engine = app.state.runtime.lookup(TEAM_A, "llm").text
    assert greedy(reference, reference.encode(PROMPT), 100)[2] == "length"  # no early EOS
    gone = metric(url, "r1_serving_requests_total", 'model="team-1/llm",status="499",version="1"')
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 100, "stream": True, "temperature": 0}
    response = post(url, "completions", body, stream=True)
    next(response.iter_lines())  # the first token arrived
    with engine.manager.pause():  # the request cannot finish by itself meanwhile
        response.close()
        deadline = time.monotonic() + 10
        while engine.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.in_flight == 0
        assert not engine.manager.output_router.result_handlers
    deadline = time.monotonic() + 10
    while engine.batch_size() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.batch_size() == 0
    after = metric(url, "r1_serving_requests_total", 'model="team-1/llm",status="499",version="1"')
    assert after == gone + 1
    again = post(url, "completions", {"model": "llm", "prompt": PROMPT, "max_tokens": 4})
    assert again.status_code == 200


def test_another_teams_model_does_not_exist_and_models_lists_text_models_only(served):
    url = served[0]
    answer = post(url, "completions", {"model": "plain", "prompt": PROMPT}, headers=B)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "model_not_found"
    listed = requests.get(f"{url}/v1/models", headers=A, timeout=10).json()
    assert sorted(m["id"] for m in listed["data"]) == ["llm", "plain"]
    listed = requests.get(f"{url}/v1/models", headers=B, timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["llm"]
    unauthorized = requests.get(f"{url}/v1/models", timeout=10)
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["message"]


def test_it_exposes_language_model_metrics(served):
    url = served[0]
    post(url, "completions", {"model": "llm", "prompt": PROMPT, "max_tokens": 5})
    labels = 'model="team-1/llm",version="1"'
    assert metric(url, "r1_serving_time_to_first_token_seconds_count", labels) >= 1
    assert metric(url, "r1_serving_time_per_output_token_seconds_count", labels) >= 1
    assert metric(url, "r1_serving_generation_seconds_count", labels) >= 1
    assert metric(url, "r1_serving_prompt_tokens_total", labels) >= 4
    assert metric(url, "r1_serving_generated_tokens_total", labels) >= 5
    page = requests.get(f"{url}/metrics", headers=METRICS, timeout=10).text
    assert "r1_serving_decode_failures_total" in page


def test_a_stream_in_flight_finishes_on_its_version_across_a_swap(served):
    url, app, source, models = served
    runtime = app.state.runtime
    old = runtime.lookup(TEAM_A, "llm")
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 60, "stream": True, "temperature": 0}
    body["stream_options"] = {"include_usage": True}
    response = post(url, "completions", body, stream=True)
    lines = response.iter_lines()
    next(lines)
    engine = old.text
    with engine.manager.pause():  # the old engine holds the stream until the swap is done
        newer = text_spec(TEAM_A, "llm", Path(models[0].artifact.path), version=2, revision=2)
        source.set_models([newer, *models[1:]])
        deadline = time.monotonic() + 30
        while runtime.lookup(TEAM_A, "llm").spec.version != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.lookup(TEAM_A, "llm").spec.version == 2
        assert engine.in_flight == 1 and old.text is engine  # still decoding, not yet closed
    rest = [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]" for line in lines if line]
    assert rest[-1] == "[DONE]" and rest[-2]["usage"]["completion_tokens"] >= 1
    answer = post(url, "completions", {"model": "llm", "prompt": PROMPT, "max_tokens": 3})
    assert answer.status_code == 200
    assert metric(url, "r1_serving_requests_total", 'model="team-1/llm",status="200",version="2"')
    deadline = time.monotonic() + 10
    while old.text is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old.text is None  # the old engine was closed once its stream ended
