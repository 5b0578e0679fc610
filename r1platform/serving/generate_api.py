"""The Open Inference Protocol's generate extension on the serving process, for language models.

| route | answer |
| --- | --- |
| `POST /v2/models/{name}[/versions/{v}]/generate` | the whole text, as JSON |
| `POST /v2/models/{name}[/versions/{v}]/generate_stream` | server-sent events, one per chunk |

The shapes are in :mod:`~r1platform.serving.generate_protocol`. The same team tokens as the
other routes, 404 for another team's model (or a version not served), 400 for a tensor model,
503 while the model is not ready, errors as the protocol's ``{"error": "..."}``. Everything
between the body and the answer is the OpenAI routes' own (:mod:`~r1platform.serving.generation`):
the same context checks, the same engine, a stream in flight that finishes on the version it
started on, a client gone mid-stream cancelled in the engine, and the same metrics (time to
first token, time per output token, tokens, decode failures, requests by status).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response

from pipelines.llm.serving_engine import DecodeFailure, TextRequest
from r1platform.serving.generate_protocol import (
    GenerateCall,
    answer,
    details,
    error_event,
    parse_generate,
    piece,
)
from r1platform.serving.generation import (
    CLIENT_GONE,
    EventStream,
    Tracker,
    prompt_ids,
    read_body,
    sampling_params,
)
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.openai_protocol import ApiError, loads
from r1platform.serving.protocol import error_body
from r1platform.serving.runtime import ModelRuntime, ServedModel
from r1platform.serving.stats import ServingStats


def error_response(error: ApiError) -> Response:
    headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
    return Response(error_body(str(error)), error.status, headers, "application/json")


class GenerateApi:
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

    async def generate(self, request: Request) -> Response:
        return await self._generate(request, stream=False)

    async def generate_stream(self, request: Request) -> Response:
        return await self._generate(request, stream=True)

    async def _generate(self, request: Request, *, stream: bool) -> Response:
        started = time.perf_counter()
        labels = ("", "")
        try:
            team = self.team(request)
            served = self._find(team, request)  # unknown or not ready: answered before the body
            labels = (served.spec.label, str(served.spec.version))
            data = loads(await read_body(request, self.max_body_bytes))
            generate = parse_generate(data, served.spec.name, stream=stream)
            # Looked up again after the awaits (a swap may have happened while the body came
            # in); from here to submit nothing awaits, so the request joins the engine it was
            # checked against.
            served = self._find(team, request)
            labels = (served.spec.label, str(served.spec.version))
            engine = served.text
            assert engine is not None
            prompt = prompt_ids(engine, generate.call)
            params = sampling_params(engine, generate.call, len(prompt), "text_input")
            generation = engine.submit(prompt, params)
        except ApiError as exc:
            self.metrics.requests.labels(*labels, str(exc.status)).inc()
            return error_response(exc)
        except DecodeFailure as exc:
            self.metrics.requests.labels(*labels, "503").inc()
            return error_response(ApiError(503, str(exc)))
        tracker = Tracker(self.metrics, self.stats, served.spec, engine, started)
        version = str(served.spec.version)
        if stream:
            return EventStream(self._stream(generate, version, generation, tracker, len(prompt)))
        return await self._whole(generate, version, generation, tracker, len(prompt))

    async def _whole(
        self,
        generate: GenerateCall,
        version: str,
        generation: TextRequest,
        tracker: Tracker,
        prompt_tokens: int,
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
            return error_response(ApiError(500, str(exc)))
        finally:
            tracker.done(status, prompt_tokens, failed=status == 500)
        info = details(finish, prompt_tokens, tracker.tokens)
        body = answer(generate, version, "".join(parts), info)
        return Response(body, media_type="application/json")

    async def _stream(
        self,
        generate: GenerateCall,
        version: str,
        generation: TextRequest,
        tracker: Tracker,
        prompt_tokens: int,
    ) -> AsyncIterator[bytes]:
        """A chunk per event that adds text; the last event's text goes with ``done: true``."""
        status, finish, tail = CLIENT_GONE, "stop", ""
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for event in events:
                    tracker.event(event)
                    if event.finish_reason is not None:
                        finish, tail = event.finish_reason, tail + event.text
                    elif event.text:
                        yield piece(generate, version, event.text)
            status = 200
            yield piece(generate, version, tail, details(finish, prompt_tokens, tracker.tokens))
        except DecodeFailure as exc:
            status = 500
            yield error_event(str(exc))
        finally:
            generation.cancel()
            tracker.done(status, prompt_tokens, failed=status == 500)

    def _find(self, team: int, request: Request) -> ServedModel:
        """The caller's text model named in the path, ready; an ApiError otherwise."""
        name = request.path_params["name"]
        served = self.runtime.lookup(team, name)
        if served is None:
            raise ApiError(404, f"model {name!r} is not served here")
        asked, serving = request.path_params.get("version"), str(served.spec.version)
        if asked is not None and asked != serving:
            message = f"version {asked} of model {name!r} is not served (version {serving} is)"
            raise ApiError(404, message)
        if not served.is_text:
            message = f"model {name!r} is not a text-generation model: call /v2/models/{name}/infer"
            raise ApiError(400, message)
        if not served.ready:
            raise ApiError(503, f"model {name!r} is not ready: {served.reason}")
        if served.upstream is not None:
            message = (
                f"model {name!r} is decoded by {served.spec.text_engine} engine servers, which "
                "this process proxies on the OpenAI routes only: call /v1/completions"
            )
            raise ApiError(501, message)
        return served
