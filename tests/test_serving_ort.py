"""ONNX Runtime GenAI folders served: og.Engine behind the OpenAI-compatible routes, over real
HTTP, on an INT8 folder the platform's model builder made from a tiny random Llama."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipelines.core import Artifact
from pipelines.llm.builder import BuildSettings, build_ort_genai
from pipelines.llm.runtime import open_text_model
from pipelines.llm.serving_engine import SamplingParams
from pipelines.llm.serving_engines import open_serving_engine
from pipelines.llm.serving_ort import OrtGenaiServingEngine
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from tests.llm_fixtures import CONTEXT
from tests.test_serving_openai import TEAM_A, events, greedy, metric, post, text_spec
from tests.text_models import ascii_llama

PROMPTS = ["the quick brown fox", "a b", "hello there, how are you today my friend", "z"]


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ort")
    # Its greedy text is always valid UTF-8: how a stream groups bytes that are not (one U+FFFD
    # or several) depends on how its tokens were delivered, which the text comparisons must not.
    checkpoint = ascii_llama(root / "checkpoint")
    out = root / "int8"
    build_ort_genai(
        checkpoint, out, root / "cache", BuildSettings(precision="int8"), lambda *_: None, threads=1
    )
    return out


def artifact(folder: Path) -> Artifact:
    return Artifact("llm v2", str(folder), "ort_genai", "int8", [], [])


@pytest.fixture(scope="module")
def reference(int8_folder):
    """The same folder decoded greedily by the platform's own ONNX Runtime GenAI loop."""
    return open_text_model(artifact(int8_folder), threads=1)


@pytest.fixture(scope="module")
def detokenizer(int8_folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(int8_folder / "tokenizer.json"))


def greedy_text(reference, detokenizer, prompt_ids: list[int], new: int) -> tuple[str, int, str]:
    """Text (decoded as the serving engine does: bytes that are not UTF-8 become U+FFFD, a
    random model makes some), generated token count and finish reason."""
    _, count, finish = greedy(reference, prompt_ids, new)
    tokens = reference.generate([prompt_ids], new)[0].tokens
    return detokenizer.decode(tokens, skip_special_tokens=True), count, finish


@pytest.fixture(scope="module")
def served(int8_folder):
    spec = text_spec(TEAM_A, "llm", int8_folder, version=2, fmt="ort_genai", max_batch_size=8)
    source = StaticModelSource([spec], {"token-a": TEAM_A})
    app = build_app(source, ServingOptions(poll_seconds=0.2, metrics_token="scrape"))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        yield url, app


def the_engine(app) -> OrtGenaiServingEngine:
    served = app.state.runtime.lookup(TEAM_A, "llm")
    assert served is not None and served.ready, served and served.error
    assert isinstance(served.text, OrtGenaiServingEngine)
    return served.text


def test_the_folder_is_served_by_onnx_runtime_genai_and_completes_as_greedy_decoding(
    served, reference, detokenizer
):
    url, app = served
    the_engine(app)
    ids = reference.encode(PROMPTS[0])
    text, count, finish = greedy_text(reference, detokenizer, ids, 12)
    body = {"model": "llm", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    answer = post(url, "completions", body).json()
    assert answer["choices"][0]["text"] == text
    assert answer["choices"][0]["finish_reason"] == finish
    assert answer["usage"]["completion_tokens"] == count
    assert answer["usage"]["prompt_tokens"] == len(ids)


def test_concurrent_streams_of_different_lengths_each_equal_their_own_greedy_decoding(
    served, reference, detokenizer
):
    """Batched together (prompts of different lengths, different token caps), every stream is
    what that prompt alone decodes to."""
    url, app = served

    def one(i: int) -> tuple[str, str, str]:
        prompt, new = PROMPTS[i % len(PROMPTS)], 6 + 3 * i
        body = {"model": "llm", "prompt": prompt, "max_tokens": new, "temperature": 0}
        found = events(post(url, "completions", {**body, "stream": True}, stream=True))
        assert found[-1] == "[DONE]"
        got = "".join(c["choices"][0]["text"] for c in found[:-1])
        want, _, finish = greedy_text(reference, detokenizer, reference.encode(prompt), new)
        return got, want, (found[-2]["choices"][0]["finish_reason"], finish)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for got, want, (finish, want_finish) in results:
        assert got == want
        assert finish == want_finish
    labels = 'model="team-1/llm"'
    assert metric(url, "r1_serving_decode_batch_size_count", labels) > 0


def test_a_chat_completion_goes_through_the_folders_chat_template(served, reference, detokenizer):
    url, _ = served
    body = {"model": "llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    answer = post(url, "chat/completions", {**body, "temperature": 0}).json()
    prompt = reference.tokenizer.apply_chat_template('[{"role": "user", "content": "hi"}]')
    want, count, _ = greedy_text(reference, detokenizer, reference.encode(prompt), 5)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert answer["usage"]["completion_tokens"] == count


def test_a_prompt_of_token_ids_is_decoded_and_ids_past_the_vocabulary_are_refused(
    served, reference, detokenizer
):
    url, _ = served
    ids = reference.encode(PROMPTS[0])
    want, _, _ = greedy_text(reference, detokenizer, ids, 6)
    body = {"model": "llm", "prompt": ids, "max_tokens": 6, "temperature": 0}
    assert post(url, "completions", body).json()["choices"][0]["text"] == want
    refused = post(url, "completions", {**body, "prompt": [1, 2, 10**6]})
    assert refused.status_code == 400 and "below" in refused.json()["error"]["message"]


def test_a_prompt_over_the_context_is_refused_and_the_engine_goes_on(served):
    url, _ = served
    body = {"model": "llm", "prompt": "x " * CONTEXT, "max_tokens": 4}
    response = post(url, "completions", body)
    assert response.status_code == 400
    assert "context" in response.json()["error"]["message"]
    ok = post(url, "completions", {"model": "llm", "prompt": "a", "max_tokens": 3})
    assert ok.status_code == 200


def test_a_client_that_goes_away_has_its_request_cancelled_in_the_engine(served):
    url, app = served
    engine = the_engine(app)
    body = {"model": "llm", "prompt": "a", "max_tokens": CONTEXT - 8, "stream": True}
    response = post(url, "completions", body, stream=True)
    next(response.iter_lines())
    response.close()
    deadline = time.monotonic() + 30
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.in_flight == 0
    assert post(url, "completions", {"model": "llm", "prompt": "b", "max_tokens": 2}).ok


def test_requests_submitted_together_are_decoded_in_one_batch(int8_folder, reference):
    """An idle engine gathers the requests that come within its queue delay into one batch."""

    async def scenario() -> tuple[list[list[int]], int]:
        engine = open_serving_engine(artifact(int8_folder), max_requests=4, threads=1)
        try:
            params = SamplingParams(max_new_tokens=8, temperature=0)
            requests = [engine.submit(engine.encode(p), params) for p in PROMPTS]
            sizes: list[int] = []

            async def tokens(request) -> list[int]:
                out = []
                async for event in request.events():
                    sizes.append(engine.batch_size())
                    out += event.token_ids
                return out

            found = await asyncio.gather(*(tokens(r) for r in requests))
            return list(found), max(sizes)
        finally:
            await asyncio.to_thread(engine.close)

    found, widest = asyncio.run(scenario())
    assert widest == len(PROMPTS)
    for prompt, tokens in zip(PROMPTS, found, strict=True):
        assert tokens == reference.generate([reference.encode(prompt)], 8)[0].tokens


def test_the_engine_cancels_one_request_and_finishes_the_others(int8_folder, reference):
    """Directly on the engine: a cancelled request leaves the batch; its neighbours finish as
    greedy decoding does."""

    async def scenario() -> tuple[list[int], int]:
        engine = open_serving_engine(artifact(int8_folder), max_requests=4, threads=1)
        try:
            ids = engine.encode(PROMPTS[0])
            keep = engine.submit(ids, SamplingParams(max_new_tokens=10, temperature=0))
            drop = engine.submit(ids, SamplingParams(max_new_tokens=40, temperature=0))
            async for _ in drop.events():
                break  # the first event, then gone (events() cancels on exit)
            tokens = [t async for event in keep.events() for t in event.token_ids]
            await asyncio.wait_for(engine.drain(), 30)
            return tokens, engine.in_flight
        finally:
            await asyncio.to_thread(engine.close)

    tokens, in_flight = asyncio.run(scenario())
    want = reference.generate([reference.encode(PROMPTS[0])], 10)[0]
    assert tokens[: len(want.tokens)] == want.tokens
    assert in_flight == 0
