"""The Open Inference Protocol's generate extension over real HTTP: a tiny random Llama decoded by
transformers' continuous batching (a real engine), from a static model list (no database)."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from pipelines.core import Artifact
from pipelines.llm.runtime import open_text_model
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from tests.llm_fixtures import CONTEXT, tiny_llama
from tests.test_serving_openai import METRICS, PROMPT, TEAM_A, TEAM_B, A, B, text_spec

LLM = 'model="team-1/llm",version="1"'


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def served(tmp_path_factory, llama, mlp_onnx):
    empty = tmp_path_factory.mktemp("broken")  # a text model folder with nothing in it
    models = [
        text_spec(TEAM_A, "llm", llama, max_batch_size=8),
        text_spec(TEAM_A, "mlp", mlp_onnx, fmt="onnx"),
        text_spec(TEAM_A, "broken", empty),
        text_spec(TEAM_B, "mlp", mlp_onnx, fmt="onnx"),
    ]
    source = StaticModelSource(models, {"token-a": TEAM_A, "token-b": TEAM_B})
    app = build_app(source, ServingOptions(poll_seconds=0.2, metrics_token="scrape"))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        yield url, app


@pytest.fixture(scope="module")
def reference(llama):
    """The same checkpoint decoded greedily by the platform's own loop."""
    return open_text_model(Artifact("ref", str(llama), "hf_checkpoint", "fp32", [], []), threads=1)


def generate(url: str, body: object, model="llm", route="generate", headers=A, **kw):
    return requests.post(
        f"{url}/v2/models/{model}/{route}", json=body, headers=headers, timeout=60, **kw
    )


def events(response: requests.Response) -> list[dict]:
    found = []
    for line in response.iter_lines():
        if line:
            assert line.startswith(b"data: ")
            found.append(json.loads(line[len(b"data: ") :]))
    return found


def greedy(reference, new: int) -> tuple[str, int, str]:
    """Text, generated token count (an end-of-sequence token counted) and finish reason."""
    generation = reference.generate([reference.encode(PROMPT)], new)[0]
    count = len(generation.tokens) + int(generation.stopped_at_eos)
    finish = "stop" if generation.stopped_at_eos else "length"
    return reference.decode(generation.tokens), count, finish


def metric(url: str, name: str, labels: str) -> float:
    page = requests.get(f"{url}/metrics", headers=METRICS, timeout=10).text
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", page, re.M)
    return float(match.group(1)) if match else 0.0


GREEDY = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0}}


def test_it_generates_what_greedy_decoding_and_the_openai_route_give(served, reference):
    url = served[0]
    text, count, finish = greedy(reference, 12)
    answer = generate(url, GREEDY)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "model_name": "llm",
        "model_version": "1",
        "text_output": text,
        "details": {
            "finish_reason": finish,
            "prompt_tokens": len(reference.encode(PROMPT)),
            "generated_tokens": count,
        },
    }
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    openai = requests.post(f"{url}/v1/completions", json=body, headers=A, timeout=60).json()
    assert openai["choices"][0]["text"] == answer.json()["text_output"]
    assert openai["usage"]["completion_tokens"] == count
    versioned = generate(url, GREEDY, model="llm/versions/1")
    assert versioned.status_code == 200 and versioned.json()["text_output"] == text


def test_it_streams_chunks_then_one_done_with_the_details(served, reference):
    url = served[0]
    text, count, finish = greedy(reference, 12)
    response = generate(url, GREEDY | {"id": "req-7"}, route="generate_stream", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(response)
    assert len(found) >= 2  # text came in more than one chunk
    assert all(e["done"] is False and "details" not in e for e in found[:-1])
    assert all(e["text_output"] for e in found[:-1])
    last = found[-1]
    assert last["done"] is True and last["details"]["finish_reason"] == finish
    assert last["details"]["generated_tokens"] == count
    assert "".join(e["text_output"] for e in found) == text
    assert {(e["model_name"], e["model_version"], e["id"]) for e in found} == {
        ("llm", "1", "req-7")
    }


def test_it_cuts_the_text_at_a_stop_string(served, reference):
    url = served[0]
    full, _, _ = greedy(reference, 30)
    start = next(
        k
        for k in range(1, len(full) - 1)
        if "\ufffd" not in full[k : k + 2] and full.find(full[k : k + 2]) == k
    )
    parameters = {
        "max_tokens": 30,
        "temperature": 0,
        "stop": ["\x00never", full[start : start + 2]],
    }
    answer = generate(url, {"text_input": PROMPT, "parameters": parameters}).json()
    assert answer["text_output"] == full[:start]
    assert answer["details"]["finish_reason"] == "stop"
    streamed = events(
        generate(url, {"text_input": PROMPT, "parameters": parameters}, "llm", "generate_stream")
    )
    assert "".join(e["text_output"] for e in streamed) == full[:start]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"text_input": PROMPT, "parameters": {"max_tokens": 0}}, "max_tokens"),
        ({"text_input": PROMPT, "parameters": {"max_tokens": -3}}, "max_tokens"),
        ({"text_input": PROMPT, "parameters": {"max_tokens": CONTEXT}}, "max_tokens"),
        ({"text_input": "fox " * CONTEXT}, "context length"),
        ({"text_input": PROMPT, "parameters": {"top_k": 5}}, "top_k"),
        ({"text_input": PROMPT, "max_tokens": 5}, "max_tokens"),
        ({"text_input": PROMPT, "parameters": {"temperature": "hot"}}, "temperature"),
        ({"text_input": PROMPT, "parameters": {"stop": 3}}, "stop"),
        ({"text_input": PROMPT, "parameters": {"seed": 1, "temperature": 0.7}}, "seed"),
        ({"text_input": PROMPT, "parameters": [1]}, "parameters"),
        ({"parameters": {"max_tokens": 4}}, "text_input"),
        ({"text_input": ""}, "text_input"),
        ({"text_input": ["a", "b"]}, "text_input"),
        ([PROMPT], "JSON object"),
    ],
)
def test_it_refuses_bad_input_with_the_protocols_error(served, route, body, said):
    answer = generate(served[0], body, route=route)
    assert answer.status_code == 400 and answer.headers["content-type"] == "application/json"
    assert set(answer.json()) == {"error"} and said in answer.json()["error"]


def test_it_refuses_a_stream_flag_the_route_contradicts_and_a_body_that_is_not_json(served):
    url = served[0]
    streaming = generate(url, {"text_input": PROMPT, "parameters": {"stream": True}})
    assert streaming.status_code == 400 and "generate_stream" in streaming.json()["error"]
    agreeing = generate(url, {"text_input": PROMPT, "parameters": {"stream": False}})
    assert agreeing.status_code == 200
    raw = requests.post(f"{url}/v2/models/llm/generate", data=b"{not", headers=A, timeout=10)
    assert raw.status_code == 400 and "not JSON" in raw.json()["error"]


def test_only_the_callers_ready_text_models_generate(served):
    url = served[0]
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 2}}
    other_team = generate(url, body, headers=B)  # team B serves no "llm"
    assert other_team.status_code == 404 and other_team.json() == {
        "error": "model 'llm' is not served here"
    }
    assert generate(url, body, model="llm/versions/2").status_code == 404
    tensor = generate(url, body, model="mlp")
    assert tensor.status_code == 400 and "/v2/models/mlp/infer" in tensor.json()["error"]
    broken = generate(url, body, model="broken", route="generate_stream")
    assert broken.status_code == 503 and "not ready" in broken.json()["error"]
    anonymous = requests.post(f"{url}/v2/models/llm/generate", json=body, timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]
    infer = requests.post(f"{url}/v2/models/llm/infer", json={}, headers=A, timeout=10)
    assert infer.status_code == 400 and "/v2/models/llm/generate" in infer.json()["error"]
    assert "generate" in requests.get(f"{url}/v2", timeout=10).json()["extensions"]


def test_it_records_the_language_model_metrics(served):
    url = served[0]
    names = [
        "r1_serving_time_to_first_token_seconds_count",
        "r1_serving_time_per_output_token_seconds_count",
        "r1_serving_generation_seconds_count",
        "r1_serving_generated_tokens_total",
        "r1_serving_prompt_tokens_total",
    ]
    before = {name: metric(url, name, LLM) for name in names}
    ok = 'model="team-1/llm",status="200",version="1"'
    bad = 'model="team-1/llm",status="400",version="1"'
    counts = (
        metric(url, "r1_serving_requests_total", ok),
        metric(url, "r1_serving_requests_total", bad),
    )
    answer = generate(url, {"text_input": PROMPT, "parameters": {"max_tokens": 5, "top_p": 0.9}})
    stream = events(generate(url, GREEDY, route="generate_stream", stream=True))
    generate(url, {"text_input": PROMPT, "parameters": {"max_tokens": 0}})
    generated = (
        answer.json()["details"]["generated_tokens"] + stream[-1]["details"]["generated_tokens"]
    )
    after = {name: metric(url, name, LLM) - before[name] for name in names}
    assert after["r1_serving_time_to_first_token_seconds_count"] == 2
    assert after["r1_serving_generation_seconds_count"] == 2
    assert after["r1_serving_time_per_output_token_seconds_count"] >= 1
    assert after["r1_serving_generated_tokens_total"] == generated
    assert after["r1_serving_prompt_tokens_total"] == 2 * answer.json()["details"]["prompt_tokens"]
    assert metric(url, "r1_serving_requests_total", ok) == counts[0] + 2
    assert metric(url, "r1_serving_requests_total", bad) == counts[1] + 1


def test_a_client_that_disconnects_is_cancelled_in_the_engine(served, reference):
    url, app = served
    engine = app.state.runtime.lookup(TEAM_A, "llm").text
    assert greedy(reference, 100)[2] == "length"  # no early end of sequence
    gone = metric(url, "r1_serving_requests_total", 'model="team-1/llm",status="499",version="1"')
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 100, "temperature": 0}}
    response = generate(url, body, route="generate_stream", stream=True)
    next(response.iter_lines())  # the first chunk arrived
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
    assert generate(url, {"text_input": PROMPT, "parameters": {"max_tokens": 3}}).status_code == 200
