"""The model page's playground: a member's prompt answered by the production version, streamed.

The dashboard never asks the user for an API token and never hands one to the browser. For a
member of the model's team (the view's scoped lookup), :func:`open_answer` signs a short-lived
token for the team (``serving.tokens.sign_playground_token``), opens a streaming request to the
pool's serving process (``ServingPool.url`` + ``/v1/completions`` or ``/v1/chat/completions``,
the same OpenAI-compatible API clients call) and :func:`relay` passes its server-sent events on,
measuring as they pass: time to first token, output tokens/s, and which version answered.

Bounded: ``MAX_NEW_TOKENS`` new tokens, ``MAX_PROMPT_CHARS`` of prompt, a connect timeout, a read
timeout (the most the serving process may stay silent) and a deadline for the whole answer. Each
stream holds one web worker while it lasts (gunicorn's sync workers), so the deadline is short.

What the browser reads (``text/event-stream``): the serving process's own ``data:`` chunks
(OpenAI's shapes), then ``event: r1-stats`` (JSON: ``ttft_ms``, ``tokens``, ``tokens_per_s``,
``seconds``, ``version``, ``pool``, ``finish_reason``) and ``data: [DONE]``; or ``event: r1-error``
(JSON: ``message``) when the stream broke off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests

from r1platform.deployments.models import Deployment, Stage
from r1platform.registry.models import RegisteredModel, Task
from r1platform.serving.tokens import sign_playground_token

MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 4000
CONNECT_TIMEOUT_SECONDS = 3.0
# The most the serving process may stay silent: before its first byte, and between two events.
READ_TIMEOUT_SECONDS = 30.0
# The whole answer; a stream still going then is cut off with an r1-error event.
DEADLINE_SECONDS = 90.0
# The most of an error body read from the serving process.
ERROR_BODY_BYTES = 16 * 1024


class PlaygroundRefused(Exception):
    """The playground cannot answer this; ``status`` is the dashboard's answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Playground:
    """What the model page's panel offers: the production deployments the dashboard can reach,
    or why it cannot (``problem``); ``chat`` when the version's tokenizer has a chat template."""

    model: RegisteredModel
    deployments: list[Deployment] = field(default_factory=list)
    problem: str = ""
    chat: bool = False

    @property
    def shown(self) -> bool:
        return self.model.task == Task.TEXT_GENERATION


@dataclass(frozen=True)
class Ask:
    """One checked playground request."""

    prompt: str
    max_tokens: int
    temperature: float
    chat: bool = False


def playground_for(model: RegisteredModel) -> Playground:
    """The model's playground: one query for its production deployments and their pools."""
    if model.task != Task.TEXT_GENERATION:
        return Playground(model, problem="the playground is for text-generation models")
    found = list(
        Deployment.objects.filter(model=model, stage=Stage.PRODUCTION)
        .select_related("pool", "version")
        .order_by("pool__name")
    )
    if not found:
        problem = (
            "No version of this model serves production yet: promote one to a pool, and its "
            "answers stream here."
        )
        return Playground(model, problem=problem)
    for deployment in found:
        deployment.model = model  # no query per deployment for what the request names
    reachable = [d for d in found if d.pool.url]
    if not reachable:
        names = ", ".join(d.pool.name for d in found)
        problem = (
            f"The dashboard cannot reach the serving process of pool {names}: the pool has no "
            "url. An admin sets it with manage.py create_pool NAME --profile KEY --url "
            "http://HOST:PORT."
        )
        return Playground(model, problem=problem)
    return Playground(model, reachable, chat=_has_chat_template(model, reachable[0]))


def _has_chat_template(model: RegisteredModel, deployment: Deployment) -> bool:
    """Read from the served version's upload facts, else the model's first version's."""
    llm = (deployment.version.details or {}).get("llm")
    if not isinstance(llm, dict):
        first = model.versions.order_by("number").values_list("details__llm", flat=True).first()
        llm = first if isinstance(first, dict) else {}
    return bool(llm.get("chat_template"))


@dataclass
class Answer:
    """The serving process's streaming response, open, and what the stats need."""

    deployment: Deployment
    response: requests.Response
    session: requests.Session
    started: float

    def close(self) -> None:
        self.response.close()
        self.session.close()


def open_answer(deployment: Deployment, ask: Ask, user_id: int) -> Answer:
    """POST the ask to the deployment's pool; the stream open, or PlaygroundRefused."""
    pool = deployment.pool
    route = "/v1/chat/completions" if ask.chat else "/v1/completions"
    url = pool.url.rstrip("/") + route
    body: dict[str, Any] = {
        "model": deployment.model.name,
        "max_tokens": ask.max_tokens,
        "temperature": ask.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ask.chat:
        body["messages"] = [{"role": "user", "content": ask.prompt}]
    else:
        body["prompt"] = ask.prompt
    token = sign_playground_token(deployment.team_id, user_id)
    session = requests.Session()
    session.trust_env = False  # the pool's own address: no proxy from the environment
    started = time.perf_counter()
    try:
        response = session.post(
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
            stream=True,
            timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
            allow_redirects=False,
        )
    except requests.Timeout:
        session.close()
        raise PlaygroundRefused(
            504,
            f"The serving process of pool {pool.name} ({pool.url}) did not answer within "
            f"{READ_TIMEOUT_SECONDS:.0f} s.",
        ) from None
    except requests.RequestException as exc:
        session.close()
        raise PlaygroundRefused(
            502,
            f"The serving process of pool {pool.name} is unreachable at {pool.url} "
            f"({type(exc).__name__}): is manage.py serve --pool {pool.name} running there?",
        ) from None
    answer = Answer(deployment, response, session, started)
    if response.status_code != 200:
        message = _error_message(response)
        answer.close()
        # A request the serving process refused (a prompt over the context length) is the
        # user's to fix; anything else is the pool's.
        status = 400 if response.status_code in (400, 413) else 502
        raise PlaygroundRefused(
            status,
            f"The serving process of pool {pool.name} answered {response.status_code}: {message}",
        )
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        answer.close()
        raise PlaygroundRefused(
            502, f"The serving process of pool {pool.name} did not answer with a stream."
        )
    return answer


def _error_message(response: requests.Response) -> str:
    """The message of an error answer (OpenAI's shape, or the Open Inference Protocol's)."""
    try:
        raw = response.raw.read(ERROR_BODY_BYTES, decode_content=True)
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError, requests.RequestException, OSError):
        return response.reason or "no message"
    if isinstance(error, dict):
        error = error.get("message")
    return str(error) if error else (response.reason or "no message")


def relay(answer: Answer) -> Iterator[bytes]:
    """The serving process's events passed on as they come, then r1-stats (or r1-error).

    Closing this generator (the browser went away) closes the upstream connection, and the
    serving process cancels the request in its engine.
    """
    deadline = answer.started + DEADLINE_SECONDS
    first = end = 0.0
    tokens, finish = 0, None
    try:
        for data in _data_events(answer.response):
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if not isinstance(payload, dict):
                continue
            if "error" in payload:
                yield _event("r1-error", {"message": _message_of(payload["error"])})
                return
            choice = (payload.get("choices") or [{}])[0]
            now = time.perf_counter()
            if _text_of(choice):
                first = first or now
            if choice.get("finish_reason"):
                finish, end = choice["finish_reason"], now
            usage = payload.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                tokens = usage["completion_tokens"]
            yield b"data: " + data.encode() + b"\n\n"
            if now > deadline:
                message = f"Stopped: the answer took over {DEADLINE_SECONDS:.0f} s."
                yield _event("r1-error", {"message": message})
                return
        else:
            message = "The serving process closed the stream before the answer was done."
            yield _event("r1-error", {"message": message})
            return
        yield _event("r1-stats", _stats(answer, first, end or time.perf_counter(), tokens, finish))
        yield b"data: [DONE]\n\n"
    except requests.RequestException as exc:  # a read timeout or a dropped connection
        message = (
            f"The stream from pool {answer.deployment.pool.name} broke off ({type(exc).__name__})."
        )
        yield _event("r1-error", {"message": message})
    except ValueError:
        yield _event("r1-error", {"message": "The serving process sent an event that is not JSON."})
    finally:
        answer.close()


def _stats(answer: Answer, first: float, end: float, tokens: int, finish: str | None) -> dict:
    """TTFT from sending the request; tokens/s over the tokens after the first (1 / TPOT)."""
    decode = end - first if first else 0.0
    return {
        "ttft_ms": round((first - answer.started) * 1000, 1) if first else None,
        "tokens": tokens,
        "tokens_per_s": round((tokens - 1) / decode, 1) if tokens > 1 and decode > 0 else None,
        "seconds": round(end - answer.started, 3),
        "version": answer.deployment.version.number,
        "pool": answer.deployment.pool.name,
        "finish_reason": finish,
    }


def _data_events(response: requests.Response) -> Iterator[str]:
    """The ``data`` of each server-sent event, as each arrives (multi-line data joined)."""
    lines: list[str] = []
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8")
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _text_of(choice: dict) -> str:
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _message_of(error: object) -> str:
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or "the serving process failed on this request")


def _event(name: str, payload: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode()
