"""The OpenAI-compatible routes of the serving process, for its language models.

| route | answer |
| --- | --- |
| `GET /v1/models` | the token's team's text-generation models that are ready |
| `POST /v1/completions` | a completion; `stream: true`: server-sent events, then `[DONE]` |
| `POST /v1/chat/completions` | the same for chat messages (the checkpoint's chat template) |

The same team tokens as the Open Inference Protocol routes, the same 404 for another team's
model, 503 while a model is not ready. Requests are decoded together by the model's
:class:`~pipelines.llm.serving_engine.ServingEngine`; a request keeps the engine it was submitted
to, so a stream in flight during a hot swap finishes on the version it started on. A client that
goes away mid-stream has its request cancelled in the engine. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pipelines.core import PipelineError
from pipelines.llm.serving_engine import (
    DecodeFailure,
    SamplingParams,
    ServingEngine,
    StreamEvent,
    TextRequest,
)
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.openai_protocol import (
    DONE,
    ApiError,
    TextCall,
    answer,
    chunk,
    loads,
    parse_chat,
    parse_completion,
    role_chunk,
    sse,
    usage,
    usage_chunk,
)
from r1platform.serving.runtime import ModelRuntime, ServedModel
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats

CLIENT_GONE = 499  # the status counted for a stream whose client disconnected


def error_response(error: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return Response(orjson.dumps(error.body()), error.status, headers, "application/json")


class EventStream(StreamingResponse):
    """Server-sent events; the body's generator is closed however the response ends, so a
    request whose client went away is cancelled in the engine at once."""

    def __init__(self, body: AsyncIterator[bytes]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]


class _Tracker:
    """One generation request's numbers, recorded once when it ends."""

    def __init__(self, api: OpenAIApi, spec: ModelSpec, engine: ServingEngine, started: float):
        self.api, self.spec, self.engine, self.started = api, spec, engine, started
        self.labels = (spec.label, str(spec.version))
        self.tokens = 0
        self.first = self.last = 0.0
        self.invalid = False
        self.recorded = False

    def event(self, event: StreamEvent) -> None:
        if event.token_ids:
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.tokens += len(event.token_ids)
            self.api.metrics.text.batch_size.labels(self.spec.label).observe(
                self.engine.batch_size()
            )
        self.invalid = self.invalid or event.invalid_utf8

    def done(self, status: int, prompt_tokens: int, failed: bool = False) -> None:
        if self.recorded:
            return
        self.recorded = True
        text, elapsed = self.api.metrics.text, time.perf_counter() - self.started
        self.api.metrics.requests.labels(*self.labels, str(status)).inc()
        self.api.stats.observe(self.spec, status, elapsed)
        text.prompt_tokens.labels(*self.labels).inc(prompt_tokens)
        text.generated_tokens.labels(*self.labels).inc(self.tokens)
        if failed or self.invalid:
            text.decode_failures.labels(*self.labels).inc()
        if self.first:
            text.ttft.labels(*self.labels).observe(self.first - self.started)
            if self.tokens > 1:
                per_token = (self.last - self.first) / (self.tokens - 1)
                text.tpot.labels(*self.labels).observe(per_token)
        if status == 200:
            text.e2e.labels(*self.labels).observe(elapsed)


class OpenAIApi:
    """The routes' handlers; ``team`` turns a request's bearer token into its team (ApiError)."""

    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: ServingMetrics,
        stats: ServingStats,
        team: Callable[[Request], int],
        max_body_bytes: int,
    ) -> None:
        self.runtime, self.metrics, self.stats = runtime, metrics, stats
        self.team, self.max_body_bytes = team, max_body_bytes

    async def models(self, request: Request) -> Response:
        try:
            team = self.team(request)
        except ApiError as exc:
            return error_response(exc)
        data = [
            {"id": m.spec.name, "object": "model", "created": 0, "owned_by": m.spec.team}
            for m in self.runtime.served()
            if m.spec.team_id == team and m.is_text and m.ready
        ]
        return Response(
            orjson.dumps({"object": "list", "data": data}), media_type="application/json"
        )

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion)

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, parse_chat)

    async def _generate(self, request: Request, parse: Callable[[dict[str, Any]], TextCall]):
        started = time.perf_counter()
        labels = ("", "")
        try:
            team = self.team(request)
            call = parse(loads(await self._body(request)))
            served = self._find(team, call.model)
            labels = (served.spec.label, str(served.spec.version))
            # From here to submit nothing awaits: the request joins the engine it was checked
            # against, and a swap cannot slip in between.
            engine = served.text
            assert engine is not None
            prompt = _prompt_ids(engine, call)
            generation = engine.submit(prompt, _params(engine, call, len(prompt)))
        except ApiError as exc:
            self.metrics.requests.labels(*labels, str(exc.status)).inc()
            return error_response(exc)
        except DecodeFailure as exc:
            self.metrics.requests.labels(*labels, "503").inc()
            return error_response(ApiError(503, str(exc), kind="server_error"))
        tracker = _Tracker(self, served.spec, engine, started)
        if call.stream:
            return EventStream(self._stream(call, generation, tracker, len(prompt)))
        return await self._whole(call, generation, tracker, len(prompt))

    async def _whole(
        self, call: TextCall, generation: TextRequest, tracker: _Tracker, prompt_tokens: int
    ) -> Response:
        parts, finish, status = [], "stop", CLIENT_GONE
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    tracker.event(event)
                    parts.append(event.text)
                    finish = event.finish_reason or finish
            status = 200
        except DecodeFailure as exc:
            status = 500
            return error_response(ApiError(500, str(exc), kind="server_error"))
        finally:
            tracker.done(status, prompt_tokens, failed=status == 500)
        body = answer(call, "".join(parts), finish, usage(prompt_tokens, tracker.tokens))
        return Response(orjson.dumps(body), media_type="application/json")

    async def _stream(
        self, call: TextCall, generation: TextRequest, tracker: _Tracker, prompt_tokens: int
    ) -> AsyncIterator[bytes]:
        status, finish = CLIENT_GONE, "stop"
        try:
            if call.chat:
                yield role_chunk(call)
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    tracker.event(event)
                    finish = event.finish_reason or finish
                    if event.text:
                        yield chunk(call, event.text)
            yield chunk(call, None, finish)
            if call.include_usage:
                yield usage_chunk(call, usage(prompt_tokens, tracker.tokens))
            status = 200
            yield DONE
        except DecodeFailure as exc:
            status = 500
            yield sse(ApiError(500, str(exc), kind="server_error").body())
            yield DONE
        finally:
            generation.cancel()
            tracker.done(status, prompt_tokens, failed=status == 500)

    def _find(self, team: int, name: str) -> ServedModel:
        served = self.runtime.lookup(team, name)
        if served is None:
            message = f"model {name!r} is not served here"
            raise ApiError(404, message, "model", code="model_not_found")
        if not served.is_text:
            message = f"model {name!r} is not a text-generation model: call /v2/models/{name}/infer"
            raise ApiError(400, message, "model")
        if not served.ready:
            message = f"model {name!r} is not ready: {served.error}"
            raise ApiError(503, message, "model", kind="server_error")
        return served

    async def _body(self, request: Request) -> bytes:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        body = bytearray()
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over the {limit} byte limit")
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"the request body is over the {limit} byte limit")
        return bytes(body)


def _prompt_ids(engine: ServingEngine, call: TextCall) -> list[int]:
    if call.chat:
        try:
            ids = engine.chat_prompt(call.prompt)  # type: ignore[arg-type]
        except PipelineError as exc:
            raise ApiError(
                400, f"{exc}: this model cannot take chat messages", "messages"
            ) from None
        except Exception as exc:  # a template that fails on these messages (its own checks)
            message = f"the chat template refused these messages: {exc}"
            raise ApiError(400, message, "messages") from None
    elif isinstance(call.prompt, str):
        ids = engine.encode(call.prompt)
    else:
        ids = list(call.prompt)  # type: ignore[arg-type]
        if max(ids) >= engine.vocab_size:
            raise ApiError(400, f"prompt token ids must be below {engine.vocab_size}", "prompt")
    if not ids:
        raise ApiError(
            400, "the prompt is empty once tokenized", "messages" if call.chat else "prompt"
        )
    return ids


def _params(engine: ServingEngine, call: TextCall, prompt_tokens: int) -> SamplingParams:
    """The request's sampling; 400 when the prompt and max_tokens do not fit the context."""
    context = engine.context_length
    param = "messages" if call.chat else "prompt"
    if prompt_tokens >= context:
        message = (
            f"the prompt is {prompt_tokens} tokens: over this model's context length of "
            f"{context} tokens, which must leave room for one new token"
        )
        raise ApiError(400, message, param, code="context_length_exceeded")
    room = context - prompt_tokens
    if call.max_tokens is not None and call.max_tokens > room:
        message = (
            f"max_tokens is {call.max_tokens}, but the prompt's {prompt_tokens} tokens leave room "
            f"for {room} in this model's context length of {context}"
        )
        raise ApiError(400, message, "max_tokens", code="context_length_exceeded")
    return SamplingParams(
        max_new_tokens=call.max_tokens or room,
        temperature=call.temperature,
        top_p=call.top_p,
        stop=call.stop,
    )
