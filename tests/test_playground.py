"""The model page's playground: the dashboard view relays a REAL serving app's stream (a tiny
random Llama decoded by the serving engine, uvicorn on loopback), authenticated by a signed
short-lived token; refusals are clear; the signed tokens are checked by the serving app."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from django.core import signing
from django.core.management import CommandError, call_command
from django.urls import reverse

from r1platform.accounts.models import Team
from r1platform.core.demo import DEMO_POOL
from r1platform.core.management.commands.up import Command as UpCommand
from r1platform.deployments.models import Deployment, ServingPool
from r1platform.registry.models import RegisteredModel, Task
from r1platform.registry.services import register_version
from r1platform.serving import playground
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from r1platform.serving.tokens import PLAYGROUND_MAX_AGE_SECONDS, sign_playground_token
from r1platform.workers.models import HardwareProfile
from tests.llm_fixtures import tiny_llama
from tests.test_serving_openai import text_spec

# Fixed team ids: the serving app's static model list is made before the test's database rows.
TEAM_A, TEAM_B = 987_301, 987_302
PROMPT = "the quick brown fox"


@pytest.fixture
def team(db) -> Team:
    """Team A at the id the serving app serves its models for (overrides conftest's)."""
    return Team.objects.create(pk=TEAM_A, name="Team A", slug="team-a")


@pytest.fixture
def other_team(db) -> Team:
    return Team.objects.create(pk=TEAM_B, name="Team B", slug="team-b")


@pytest.fixture(scope="module")
def serving(tmp_path_factory) -> Iterator[str]:
    """Team A's "chatty" and team B's "rival" on a real serving app; plain tokens for both."""
    llama = tiny_llama(tmp_path_factory.mktemp("llama") / "model")
    models = [text_spec(TEAM_A, "chatty", llama), text_spec(TEAM_B, "rival", llama)]
    source = StaticModelSource(models, {"token-a": TEAM_A, "token-b": TEAM_B})
    app = build_app(source, ServingOptions(poll_seconds=0.2, metrics_token=""))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        yield url


def make_model(team: Team, name: str = "chatty", *, chat: bool = True) -> RegisteredModel:
    model = RegisteredModel.objects.create(
        team=team, name=name, task=Task.TEXT_GENERATION, mlflow_name=f"play.{name}"
    )
    register_version(
        model,
        relative_file=f"models/{name}.tar",
        sha256="c" * 64,
        size_bytes=10,
        format="hf_checkpoint",
        precision="fp32",
        inputs=[],
        outputs=[],
        details={"llm": {"chat_template": chat, "context_length": 128}},
    )
    return model


def make_pool(name: str = "play", url: str = "") -> ServingPool:
    profile, _ = HardwareProfile.objects.get_or_create(
        key="onnxruntime-cpu-play-00000000",
        defaults={
            "backend": "onnxruntime",
            "backend_version": "1.0.0",
            "device_kind": "cpu",
            "device_name": "Play CPU",
        },
    )
    return ServingPool.objects.create(name=name, profile=profile, url=url)


def deploy(model: RegisteredModel, pool: ServingPool) -> Deployment:
    """Made directly, with no certificate: these tests are about the playground, not the gate."""
    version = model.versions.get(number=1)
    return Deployment.objects.create(
        team=model.team, model=model, pool=pool, stage="production", version=version
    )


@pytest.fixture
def chatty(team, serving) -> RegisteredModel:
    model = make_model(team)
    deploy(model, make_pool(url=serving))
    return model


def ask(client, model: RegisteredModel, **fields):
    data = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "mode": "completion"}
    data["pool"] = "play"
    return client.post(reverse("serving:playground", args=[model.pk]), data | fields)


def read_events(response) -> list[tuple[str, str, float]]:
    """(event name, data, seconds since the first event) of each relayed event."""
    found, buffer, start = [], b"", None
    for part in response.streaming_content:
        buffer += part
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            start = start or time.perf_counter()
            name, data = "message", []
            for line in block.decode().split("\n"):
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    data.append(line[len("data: ") :])
            found.append((name, "\n".join(data), time.perf_counter() - start))
    assert buffer == b""
    return found


def direct(url: str, route: str, body: dict, token: str = "token-a") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.post(f"{url}/v1/{route}", json=body, headers=headers, timeout=60)


# -- the relayed answer ----------------------------------------------------------------------------


def test_it_relays_the_production_versions_greedy_answer_token_by_token(
    member_client, chatty, serving
):
    body = {"model": "chatty", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    expected = direct(serving, "completions", body).json()

    response = ask(member_client, chatty)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/event-stream")
    events = read_events(response)
    chunks = [json.loads(d) for n, d, _ in events if n == "message" and d != "[DONE]"]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(texts) == expected["choices"][0]["text"]
    assert len([t for t in texts if t]) > 1, "the answer came in one piece, not streamed"
    stats = json.loads(next(d for n, d, _ in events if n == "r1-stats"))
    assert stats["tokens"] == expected["usage"]["completion_tokens"]
    assert stats["version"] == 1 and stats["pool"] == "play"
    assert stats["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert 0 < stats["ttft_ms"] <= stats["seconds"] * 1000
    assert stats["tokens_per_s"] > 0
    assert events[-1][:2] == ("message", "[DONE]")
    assert not [n for n, _, _ in events if n == "r1-error"]


def test_it_answers_in_chat_mode_through_the_chat_template(member_client, chatty, serving):
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": "chatty", "messages": messages, "max_tokens": 10, "temperature": 0}
    expected = direct(serving, "chat/completions", body).json()

    response = ask(member_client, chatty, mode="chat", max_tokens=10)

    events = read_events(response)
    chunks = [json.loads(d) for n, d, _ in events if n == "message" and d != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected["choices"][0]["message"]["content"]
    assert (
        json.loads(next(d for n, d, _ in events if n == "r1-stats"))["tokens"]
        == (expected["usage"]["completion_tokens"])
    )


def test_the_model_page_shows_the_panel_to_members(member_client, chatty):
    page = member_client.get(chatty.get_absolute_url()).content.decode()

    assert 'data-testid="playground-form"' in page
    assert reverse("serving:playground", args=[chatty.pk]) in page
    assert "r1/playground.js" in page
    assert 'name="mode"' in page and "Chat (one user message)" in page


def test_the_model_page_says_why_there_is_no_playground(member_client, team):
    model = make_model(team, chat=False)

    page = member_client.get(model.get_absolute_url()).content.decode()

    assert 'data-testid="playground-problem"' in page
    assert "No version of this model serves production yet" in page
    assert 'data-testid="playground-form"' not in page


def test_a_tensor_model_has_no_playground(member_client, version):
    page = member_client.get(version.model.get_absolute_url()).content.decode()

    assert 'data-testid="playground"' not in page
    response = member_client.post(reverse("serving:playground", args=[version.model.pk]))
    assert response.status_code == 409


# -- who may ask -----------------------------------------------------------------------------------


def test_a_member_of_another_team_gets_404(client, outsider, chatty):
    client.force_login(outsider)

    response = ask(client, chatty)

    assert response.status_code == 404


def test_an_anonymous_user_is_sent_to_log_in(client, chatty):
    response = ask(client, chatty)

    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_a_post_without_the_csrf_token_is_refused(user, chatty):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)

    assert ask(strict, chatty).status_code == 403


# -- refusals, clearly -----------------------------------------------------------------------------


def test_no_production_deployment_is_refused_clearly(member_client, team):
    model = make_model(team)
    staging = make_pool(url="http://127.0.0.1:9")
    Deployment.objects.create(
        team=team, model=model, pool=staging, stage="staging", version=model.versions.get()
    )

    response = ask(member_client, model)

    assert response.status_code == 409
    assert "No version of this model serves production yet" in response.json()["error"]


def test_a_pool_without_a_url_is_refused_clearly(member_client, team):
    model = make_model(team)
    deploy(model, make_pool(url=""))

    response = ask(member_client, model)

    assert response.status_code == 409
    error = response.json()["error"]
    assert "pool play: the pool has no url" in error and "create_pool" in error and "--url" in error


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_an_unreachable_serving_process_is_refused_clearly(member_client, team):
    model = make_model(team)
    deploy(model, make_pool(url=f"http://127.0.0.1:{_closed_port()}"))

    response = ask(member_client, model)

    assert response.status_code == 502
    error = response.json()["error"]
    assert "unreachable" in error and "manage.py serve --pool play" in error


def test_a_serving_process_that_does_not_answer_times_out(member_client, team, monkeypatch):
    monkeypatch.setattr(playground, "READ_TIMEOUT_SECONDS", 0.5)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        model = make_model(team)
        deploy(model, make_pool(url=f"http://127.0.0.1:{silent.getsockname()[1]}"))

        started = time.monotonic()
        response = ask(member_client, model)

    assert time.monotonic() - started < 10
    assert response.status_code == 504
    assert "did not answer within" in response.json()["error"]


def test_an_error_of_the_serving_process_is_shown(member_client, team, serving):
    model = make_model(team, name="ghost")  # deployed here, but that process does not serve it
    deploy(model, make_pool(url=serving))

    response = ask(member_client, model)

    assert response.status_code == 502
    error = response.json()["error"]
    assert "answered 404" in error and "'ghost' is not served here" in error


def test_a_prompt_the_model_cannot_take_is_the_users_to_fix(member_client, team, serving):
    model = make_model(team, chat=True)
    deploy(model, make_pool(url=serving))

    response = ask(member_client, model, prompt="fox " * 200)  # over the 128-token context

    assert response.status_code == 400
    assert "context length" in response.json()["error"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", "513", "less than or equal to 512"),
        ("max_tokens", "0", "greater than or equal to 1"),
        ("temperature", "2.5", "less than or equal to 2"),
        ("prompt", "x" * 4001, "at most 4000 characters"),
        ("prompt", "", "required"),
        ("pool", "elsewhere", "not one of the available choices"),
    ],
)
def test_bad_input_is_refused_before_anything_is_sent(member_client, chatty, field, value, message):
    response = ask(member_client, chatty, **{field: value})

    assert response.status_code == 400
    assert message in response.json()["error"]


def test_chat_mode_is_refused_without_a_chat_template(member_client, team, serving):
    model = make_model(team, chat=False)
    deploy(model, make_pool(url=serving))

    response = ask(member_client, model, mode="chat")

    assert response.status_code == 400
    assert response.json()["error"].startswith("Mode: Select a valid choice. chat")


# -- the signed token, at the serving app ----------------------------------------------------------


def _models(url: str, token: str) -> requests.Response:
    return requests.get(
        f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def test_a_signed_token_calls_for_its_team_only(serving):
    token = sign_playground_token(TEAM_A, user_id=1)

    assert [m["id"] for m in _models(serving, token).json()["data"]] == ["chatty"]
    body = {"model": "rival", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    refused = direct(serving, "completions", body, token=token)
    assert refused.status_code == 404  # team B's model does not exist for team A
    assert direct(serving, "completions", body, token="token-b").status_code == 200


def test_a_forged_or_expired_signed_token_is_401(serving, monkeypatch):
    good = sign_playground_token(TEAM_A, user_id=1)
    tampered = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    other_salt = "r1pg." + signing.dumps({"team": TEAM_A, "user": 1}, salt="another-purpose")
    real_time = time.time
    monkeypatch.setattr(signing.time, "time", lambda: real_time() - PLAYGROUND_MAX_AGE_SECONDS - 5)
    expired = sign_playground_token(TEAM_A, user_id=1)
    monkeypatch.undo()

    for token in (tampered, other_salt, expired):
        response = _models(serving, token)
        assert response.status_code == 401, token
        assert response.headers["www-authenticate"] == "Bearer"
    assert _models(serving, good).status_code == 200
    assert _models(serving, "token-a").status_code == 200  # a plain team token still works


# -- where the dashboard reaches the pool ----------------------------------------------------------


def test_create_pool_sets_keeps_and_clears_the_url(db):
    HardwareProfile.objects.create(
        key="cpu-url",
        backend="onnxruntime",
        backend_version="1",
        device_kind="cpu",
        device_name="x",
    )
    call_command("create_pool", "edge", "--profile", "cpu-url", "--url", "http://10.0.0.5:8001/")
    assert ServingPool.objects.get(name="edge").url == "http://10.0.0.5:8001"
    call_command("create_pool", "edge", "--profile", "cpu-url", "--description", "kept")
    assert ServingPool.objects.get(name="edge").url == "http://10.0.0.5:8001"
    for bad in ("ftp://10.0.0.5", "not a url", "http://user:pw@10.0.0.5:8001"):
        with pytest.raises(CommandError, match="--url"):
            call_command("create_pool", "edge", "--profile", "cpu-url", "--url", bad)
    assert ServingPool.objects.get(name="edge").url == "http://10.0.0.5:8001"
    call_command("create_pool", "edge", "--profile", "cpu-url", "--url", "")
    assert ServingPool.objects.get(name="edge").url == ""


def test_up_points_the_demo_pool_at_the_serving_process_it_starts(db, monkeypatch):
    make_pool(name=DEMO_POOL)
    command = UpCommand()
    spawned: list[list[str]] = []
    waited: list[str] = []
    monkeypatch.setattr(command, "_spawn", lambda name, cmd, env, logs: spawned.append(cmd))
    monkeypatch.setattr(command, "_wait_ready", lambda url, children: waited.append(url))

    url = command._start_serving({}, {}, "0.0.0.0", 8123, None)

    assert url == "http://127.0.0.1:8123"
    assert waited == ["http://127.0.0.1:8123/v2/health/live"]
    assert spawned[0][-4:] == ["--host", "0.0.0.0", "--port", "8123"]
    assert ServingPool.objects.get(name=DEMO_POOL).url == "http://127.0.0.1:8123"


def test_a_browser_going_away_closes_the_upstream_stream(member_client, chatty, monkeypatch):
    closed = threading.Event()
    real_close = playground.Answer.close

    def close(self):
        real_close(self)
        closed.set()

    monkeypatch.setattr(playground.Answer, "close", close)
    response = ask(member_client, chatty, max_tokens=64)
    stream = iter(response.streaming_content)
    next(stream)  # the first event, then the browser leaves

    response.close()

    assert closed.wait(5)
