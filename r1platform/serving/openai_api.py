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
from starlette.responses import Response

from pipelines.llm.serving_engine import DecodeFailure, TextRequest
from r1platform.serving.generation import (
    CLIENT_GONE,
    EventStream,
    Tracker,
    prompt_ids,
    read_body,
    sampling_params,
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
from r1platform.serving.stats import ServingStats


def error_response(error: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return Response(orjson.dumps(error.body()), error.status, headers, "application/json")


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
        return await self._generate(request, parse_completion, "completions")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chat/completions")

    async def _generate(
        self, request: Request, parse: Callable[[dict[str, Any]], TextCall], route: str
    ) -> Response:
        started = time.perf_counter()
        labels = ("", "")
        try:
            team = self.team(request)
            body = loads(await self._body(request))
            call = parse(body)
            served = self._find(team, call.model)
            labels = (served.spec.label, str(served.spec.version))
            if served.upstream is not None:  # engine servers: checked here, decoded there
                return await served.upstream.forward(served.spec, route, body)
            # From here to submit nothing awaits: the request joins the engine it was checked
            # against, and a swap cannot slip in between.
            engine = served.text
            assert engine is not None
            prompt = prompt_ids(engine, call)
            generation = engine.submit(prompt, sampling_params(engine, call, len(prompt)))
        except ApiError as exc:
            self.metrics.requests.labels(*labels, str(exc.status)).inc()
            return error_response(exc)
        except DecodeFailure as exc:
            self.metrics.requests.labels(*labels, "503").inc()
            return error_response(ApiError(503, str(exc), kind="server_error"))
        tracker = Tracker(self.metrics, self.stats, served.spec, engine, started)
        if call.stream:
            return EventStream(self._stream(call, generation, tracker, len(prompt)))
        return await self._whole(call, generation, tracker, len(prompt))

    async def _whole(
        self, call: TextCall, generation: TextRequest, tracker: Tracker, prompt_tokens: int
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
        self, call: TextCall, generation: TextRequest, tracker: Tracker, prompt_tokens: int
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
            message = f"model {name!r} is not ready: {served.reason}"
            raise ApiError(503, message, "model", kind="server_error")
        return served

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self.max_body_bytes)
