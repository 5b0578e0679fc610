"""Engine servers supervised and proxied by the serving process, on this CPU machine.

The supervisor and the proxy are generic over the engine server's command, so a real
OpenAI-compatible server stands in for ``vllm serve``: this project's own serving app on a tiny
random Llama, started as two processes (``tests/engine_upstream.py``) by the real supervisor.
Requests go over real HTTP through the real proxy (``EngineDeployment.forward``, mounted the way
the serving process's OpenAI routes call it), and every answer is checked against the upstream's
own answer to the same request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from pipelines.core import Artifact
from r1platform.serving.engine_deployments import EngineDeployment
from r1platform.serving.engine_supervisor import FAILED, READY, EngineServer, RemoteServer
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats
from tests.llm_fixtures import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "upstream-key"
UPSTREAM_NAME = "llm"  # what the engine serves
CLIENT_NAME = "chatbot"  # what the team's requests name (the deployment's model)
PROMPT = "the quick brown fox"


def spec_for(folder: Path) -> ModelSpec:
    artifact = Artifact(f"{CLIENT_NAME} v3", str(folder), "hf_checkpoint", "fp32", [], [])
    return ModelSpec(team_id=7, team="team-7", name=CLIENT_NAME, version=3, artifact=artifact)


def upstream_server(index: int, folder: Path, work: Path, **kw) -> EngineServer:
    """A replica whose engine server is this project's serving app on ``folder``."""
    env = {
        "R1_UPSTREAM_TOKEN": TOKEN,
        "R1_HOME": str(work / f"home-{index}"),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "tests.engine_upstream", str(folder)]
    options = {"startup_timeout": 180.0, "check_seconds": 0.5, "backoff_seconds": (0.2, 2.0)}
    return EngineServer(
        f"replica {index}",
        lambda port: [*argv, str(port), UPSTREAM_NAME],
        work / f"replica-{index}.log",
        env=env,
        health_path=f"/v2/models/{UPSTREAM_NAME}/ready",
        headers={"Authorization": f"Bearer {TOKEN}"},
        **(options | kw),
    )


def proxy_app(deployment: EngineDeployment) -> Starlette:
    """The OpenAI routes as the serving process answers them for an engine deployment: the body
    read as JSON, then ``forward`` (the team-token check in front is the app's own)."""

    async def generate(request: Request):
        body = orjson.loads(await request.body())
        route = request.url.path.removeprefix("/v1/")
        return await deployment.forward(deployment.spec, route, body)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await deployment.close()

    routes = [
        Route("/v1/completions", generate, methods=["POST"]),
        Route("/v1/chat/completions", generate, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[tuple[str, EngineDeployment, ServingMetrics]]:
    work = tmp_path_factory.mktemp("engines")
    folder = tiny_llama(work / "model")
    replicas = [upstream_server(i, folder, work) for i in range(2)]
    metrics = ServingMetrics()
    deployment = EngineDeployment(
        spec_for(folder), replicas, metrics, ServingStats(), upstream_model=UPSTREAM_NAME
    )
    deployment.start()
    try:
        assert deployment.wait_ready(240), deployment.reason
        assert all(r.state == READY for r in replicas), deployment.reason
        with serving_in_thread(proxy_app(deployment)) as url:
            yield url, deployment, metrics
    finally:
        for replica in replicas:
            replica.stop()


def post(url: str, route: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{url}/v1/{route}", json=body, timeout=120, **kw)


def direct(deployment: EngineDeployment, index: int, route: str, body: dict, **kw):
    """The same request sent straight to one replica's engine server, as the engine names it."""
    replica = deployment.replicas[index]
    return requests.post(
        f"{replica.base_url}/v1/{route}",
        json=body | {"model": UPSTREAM_NAME},
        headers=replica.headers,
        timeout=120,
        **kw,
    )


def events(response: requests.Response) -> list:
    found = []
    for line in response.iter_lines():
        if line:
            assert line.startswith(b"data: "), line
            data = line[len(b"data: ") :].decode()
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def upstream_count(deployment: EngineDeployment, index: int, status: str = "200") -> float:
    """Requests the replica's own engine server answered with ``status`` (its /metrics)."""
    replica = deployment.replicas[index]
    page = requests.get(f"{replica.base_url}/metrics", headers=replica.headers, timeout=10).text
    labels = f'model="upstream/{UPSTREAM_NAME}",status="{status}",version="1"'
    match = re.search(rf"^r1_serving_requests_total\{{{re.escape(labels)}\}} (\S+)$", page, re.M)
    return float(match.group(1)) if match else 0.0


def sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


LABELS = {"model": f"team-7/{CLIENT_NAME}", "version": "3"}


def test_a_completion_is_the_upstreams_answer_under_the_clients_model_name(gateway):
    url, deployment, metrics = gateway
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    before = sample(metrics, "r1_serving_generated_tokens_total", **LABELS)
    answer = post(url, "completions", body)
    assert answer.status_code == 200, answer.text
    proxied, expected = answer.json(), direct(deployment, 0, "completions", body).json()
    assert proxied["model"] == CLIENT_NAME and expected["model"] == UPSTREAM_NAME
    assert proxied["choices"] == expected["choices"]
    assert proxied["usage"] == expected["usage"]
    generated = sample(metrics, "r1_serving_generated_tokens_total", **LABELS) - before
    assert generated == expected["usage"]["completion_tokens"]


def test_a_stream_passes_through_as_the_upstream_streams_it(gateway):
    url, deployment, metrics = gateway
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    ttft_before = sample(metrics, "r1_serving_time_to_first_token_seconds_count", **LABELS)
    response = post(url, "completions", body, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    proxied = events(response)
    expected = events(direct(deployment, 1, "completions", body, stream=True))
    # Chunks are the engine's own (how many tokens each carries depends on timing): the text,
    # the finish and the usage are what must agree.
    assert proxied[-1] == "[DONE]" and expected[-1] == "[DONE]"
    assert all(c["model"] == CLIENT_NAME for c in proxied[:-1])
    text = "".join(c["choices"][0]["text"] for c in proxied[:-2])
    assert text == "".join(c["choices"][0]["text"] for c in expected[:-2]) and text
    assert proxied[-3]["choices"][0]["finish_reason"] == expected[-3]["choices"][0]["finish_reason"]
    assert proxied[-2]["choices"] == [] and proxied[-2]["usage"] == expected[-2]["usage"]
    ttft = sample(metrics, "r1_serving_time_to_first_token_seconds_count", **LABELS)
    assert ttft == ttft_before + 1
    tpot = sample(metrics, "r1_serving_time_per_output_token_seconds_count", **LABELS)
    assert tpot >= 1


def test_the_usage_chunk_only_the_proxy_asked_for_is_not_sent_on(gateway):
    url, _, metrics = gateway
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    prompt_before = sample(metrics, "r1_serving_prompt_tokens_total", **LABELS)
    found = events(post(url, "completions", body | {"stream": True}, stream=True))
    assert found[-1] == "[DONE]"
    assert all(c["choices"] and "usage" not in c for c in found[:-1])
    # ... but it was read: the prompt's tokens are counted.
    assert sample(metrics, "r1_serving_prompt_tokens_total", **LABELS) > prompt_before


def test_chat_streams_through_the_proxy(gateway):
    url, deployment, _ = gateway
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": CLIENT_NAME, "messages": messages, "max_tokens": 8, "temperature": 0}
    proxied = events(post(url, "chat/completions", body | {"stream": True}, stream=True))
    streamed = body | {"stream": True}
    expected = events(direct(deployment, 0, "chat/completions", streamed, stream=True))
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in proxied[:-1])
    wanted = "".join(c["choices"][0]["delta"].get("content", "") for c in expected[:-1])
    assert content == wanted and proxied[0]["object"] == "chat.completion.chunk"


def test_the_engines_4xx_is_passed_through_and_not_retried(gateway):
    url, deployment, metrics = gateway
    sent_before = [r["sent"] for r in deployment.replica_states()]
    answer = post(url, "completions", {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 0})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "max_tokens"
    assert sum(r["sent"] for r in deployment.replica_states()) == sum(sent_before) + 1
    assert sample(metrics, "r1_serving_requests_total", status="400", **LABELS) >= 1


def test_least_in_flight_spreads_concurrent_streams_over_both_replicas(gateway):
    url, deployment, _ = gateway
    before = [upstream_count(deployment, i) for i in range(2)]
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 40, "stream": True}

    def one(i: int) -> list:
        return events(post(url, "completions", body | {"temperature": 0.5 + i / 10}, stream=True))

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(r[-1] == "[DONE]" for r in results)
    served = [upstream_count(deployment, i) - before[i] for i in range(2)]
    assert sum(served) == 6 and min(served) >= 2, served  # 3 and 3 unless one ended very early
    assert [r["in_flight"] for r in deployment.replica_states()] == [0, 0]


def test_requests_one_after_another_take_turns(gateway):
    url, deployment, _ = gateway
    before = [upstream_count(deployment, i) for i in range(2)]
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    for _ in range(4):
        assert post(url, "completions", body).status_code == 200
    assert [upstream_count(deployment, i) - before[i] for i in range(2)] == [2, 2]


def test_a_client_that_goes_away_cancels_the_upstream_request(gateway):
    url, deployment, metrics = gateway
    gone_before = sum(upstream_count(deployment, i, "499") for i in range(2))
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 100, "stream": True}
    with post(url, "completions", body | {"temperature": 1.0}, stream=True) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line).startswith(b"data: ")
    deadline = time.monotonic() + 30
    while sum(upstream_count(deployment, i, "499") for i in range(2)) == gone_before:
        assert time.monotonic() < deadline, "the upstream request was not cancelled"
        time.sleep(0.2)
    assert sample(metrics, "r1_serving_requests_total", status="499", **LABELS) >= 1
    assert [r["in_flight"] for r in deployment.replica_states()] == [0, 0]


def test_a_remote_replica_is_followed_by_its_health(gateway):
    _, deployment, _ = gateway
    first = deployment.replicas[0]
    remote = RemoteServer("remote", first.base_url, health_path=first.health_path,
                          headers=first.headers, check_seconds=0.2)  # fmt: skip
    remote.start()
    try:
        deadline = time.monotonic() + 10
        while remote.state != READY:
            assert time.monotonic() < deadline, remote.reason
            time.sleep(0.05)
    finally:
        remote.stop()
    gone = RemoteServer("gone", "http://127.0.0.1:9", check_seconds=0.2)
    gone.start()
    try:
        deadline = time.monotonic() + 10
        while gone.state != FAILED:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "127.0.0.1:9" in gone.reason and "unreachable" in gone.reason
    finally:
        gone.stop()


def test_a_killed_replica_is_restarted_while_the_other_answers(gateway):
    url, deployment, _ = gateway
    killed = deployment.replicas[0]
    assert isinstance(killed, EngineServer)
    pid, other_before = killed.pid, upstream_count(deployment, 1)
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    answers = [post(url, "completions", body) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    assert upstream_count(deployment, 1) - other_before == 4  # all answered by the other
    deadline = time.monotonic() + 180
    while killed.restarts == 0 or killed.state != READY:  # seen dead, started again, healthy
        assert time.monotonic() < deadline, killed.reason
        time.sleep(0.1)
    assert killed.pid not in (None, pid) and killed.restarts == 1
    assert killed.log_path.read_text().count("=== ") == 2  # started twice, both logged
    assert post(url, "completions", body).status_code == 200


def test_a_replica_killed_mid_stream_ends_the_clients_stream_cleanly(gateway):
    url, deployment, metrics = gateway
    body = {"model": CLIENT_NAME, "prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    whole = direct(deployment, 1, "completions", body).json()
    assert whole["choices"][0]["finish_reason"] == "length"  # greedy: 100 tokens, no early end
    failures = sample(metrics, "r1_serving_decode_failures_total", **LABELS)
    with post(url, "completions", body | {"stream": True}, stream=True) as response:
        lines = (line for line in response.iter_lines() if line)
        assert json.loads(next(lines)[len(b"data: ") :])["choices"][0]["text"] is not None
        serving = next(r for r, s in zip(deployment.replicas, deployment.replica_states(),
                                         strict=True) if s["in_flight"])  # fmt: skip
        os.killpg(serving.pid, signal.SIGKILL)
        rest = [line[len(b"data: ") :] for line in lines]
    assert rest[-1] == b"[DONE]"
    error = json.loads(rest[-2])["error"]
    assert "the engine server" in error["message"] and error["type"] == "server_error"
    assert sample(metrics, "r1_serving_decode_failures_total", **LABELS) == failures + 1
    assert sample(metrics, "r1_serving_requests_total", status="500", **LABELS) >= 1
    deadline = time.monotonic() + 180
    while serving.pid is None or serving.state != READY:
        assert time.monotonic() < deadline, serving.reason
        time.sleep(0.1)
    assert [r["in_flight"] for r in deployment.replica_states()] == [0, 0]


# -- replicas that never become healthy (no model needed) -------------------------------------


def command(code: str):
    return lambda port: [sys.executable, "-c", code]


def test_a_replica_that_exits_at_start_is_failed_with_its_log_tail(tmp_path):
    code = "import sys; print('loading weights'); print('CUDA out of memory (fake)'); sys.exit(3)"
    server = EngineServer("replica 0", command(code), tmp_path / "r0.log", failed_starts=2,
                          backoff_seconds=(0.05, 0.1))  # fmt: skip
    spec = spec_for(tmp_path)
    metrics = ServingMetrics()
    deployment = EngineDeployment(spec, [server], metrics, ServingStats(), upstream_model="m")
    deployment.start()
    try:
        assert not deployment.wait_ready(30)
        assert server.state == FAILED and server.given_up
        assert "exited with code 3 before answering /health" in server.reason
        assert "2 starts in a row" in server.reason
        assert "CUDA out of memory (fake)" in server.reason  # the log's last lines
        assert server.log_path.read_text().count("=== ") == 2  # two starts, each logged
        assert "CUDA out of memory (fake)" in deployment.reason
        answer = asyncio.run(deployment.proxy.forward(spec, "completions", {"model": "x"}, "m"))
        assert answer.status_code == 503
        assert b"CUDA out of memory (fake)" in answer.body
    finally:
        server.stop()


def test_a_replica_that_never_answers_is_stopped_after_its_startup_timeout(tmp_path):
    pid_file = tmp_path / "pid"
    code = (
        "import os, time; "
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('still compiling kernels', flush=True); time.sleep(120)"
    )
    server = EngineServer("replica 0", command(code), tmp_path / "r0.log", startup_timeout=1.5,
                          failed_starts=1, stop_grace_seconds=2)  # fmt: skip
    server.start()
    try:
        assert not server.wait_ready(30)
        assert server.state == FAILED
        assert "did not answer /health within 1.5 s" in server.reason
        assert "still compiling kernels" in server.reason
        child = int(pid_file.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # stopped and reaped
    finally:
        server.stop()


def test_a_command_that_is_not_installed_fails_at_once(tmp_path):
    server = EngineServer("replica 0", lambda port: ["no-such-engine-serve"], tmp_path / "r.log")
    server.start()
    assert not server.wait_ready(10)
    assert server.given_up and "could not be started" in server.reason
    server.stop()
