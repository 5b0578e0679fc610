"""The proxy from the serving process's OpenAI routes to a deployment's engine servers.

The serving process checks the team token and finds the model (the same 401/404/503 as the
built-in engine); :meth:`UpstreamProxy.forward` then sends the request body on to one replica's
``/v1/completions`` or ``/v1/chat/completions``:

* the body's ``model`` becomes the engine's served name (the deployment's name for vLLM, the
  folder for TensorRT-LLM, an adapter's name for a LoRA adapter), and back to the name the
  client used in every answer; the client's token is never sent on (the engine gets the
  per-deployment key it was started with);
* **routing**: the ready replica with the fewest requests in flight, ties taken in turn;
* a replica that refuses the connection or answers 5xx is marked down for ``down_seconds`` (and
  its supervisor asked to check it now), and the request is sent once to another replica, which
  is safe because nothing has reached the client yet; a 4xx is the engine's verdict on the
  request and is passed through as it is;
* ``stream: true`` answers are passed through event by event as they arrive (server-sent
  events; the engine's own chunks). The engine is always asked for the usage chunk
  (``stream_options.include_usage``), which is dropped again unless the client asked for it. A
  client that goes away closes the upstream connection, which cancels the request in the engine;
  an engine that breaks off mid-stream ends the client's stream with an error event and
  ``[DONE]``.

Metrics are those of the built-in engine (``metrics.TextMetrics``, requests by status, the
serving history), read from the stream: time to first token (the first chunk with text), time per
output token, end-to-end time, prompt and generated tokens from ``usage``, decode failures (an
error event, a stream broken off, text holding U+FFFD, the replacement character an engine emits
for invalid UTF-8). A non-streamed answer has no first-token time.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from r1platform.serving.engine_supervisor import READY, Replica
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.openai_protocol import ApiError
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats

ROUTES = ("completions", "chat/completions")
CLIENT_GONE = 499  # as the built-in routes count a stream whose client disconnected
EVENT_END = re.compile(rb"\r?\n\r?\n")
DONE_EVENT = b"data: [DONE]\n\n"
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


@dataclass
class _Route:
    """A replica as the proxy sees it."""

    replica: Replica
    in_flight: int = 0
    sent: int = 0
    down_until: float = 0.0

    def usable(self, now: float) -> bool:
        return self.replica.state == READY and self.down_until <= now


def error_response(status: int, message: str) -> Response:
    body = ApiError(status, message, kind="server_error").body()
    return Response(orjson.dumps(body), status, media_type="application/json")


class _Record:
    """One proxied request's numbers, recorded once when it ends."""

    def __init__(self, metrics: ServingMetrics, stats: ServingStats, spec: ModelSpec) -> None:
        self.metrics, self.stats, self.spec = metrics, stats, spec
        self.labels = (spec.label, str(spec.version))
        self.started = time.perf_counter()
        self.first = self.last = 0.0
        self.chunks = 0
        self.prompt_tokens = 0
        self.completion_tokens: int | None = None
        self.failed = False
        self.recorded = False

    def text(self, text: str) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.chunks += 1
        self.failed = self.failed or "\ufffd" in text

    def usage(self, usage: Mapping[str, Any]) -> None:
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)

    def done(self, status: int) -> None:
        if self.recorded:
            return
        self.recorded = True
        text, elapsed = self.metrics.text, time.perf_counter() - self.started
        self.metrics.requests.labels(*self.labels, str(status)).inc()
        self.stats.observe(self.spec, status, elapsed)
        tokens = self.chunks if self.completion_tokens is None else self.completion_tokens
        text.prompt_tokens.labels(*self.labels).inc(self.prompt_tokens)
        text.generated_tokens.labels(*self.labels).inc(tokens)
        if self.failed:
            text.decode_failures.labels(*self.labels).inc()
        if self.first:
            text.ttft.labels(*self.labels).observe(self.first - self.started)
            if tokens > 1:
                text.tpot.labels(*self.labels).observe((self.last - self.first) / (tokens - 1))
        if status == 200:
            text.e2e.labels(*self.labels).observe(elapsed)


class _Passthrough:
    """One streamed answer in flight: ended once, by the stream or by the response around it
    (a response never iterated still gives its replica and its connection back)."""

    def __init__(self, route: _Route, upstream: aiohttp.ClientResponse, record: _Record) -> None:
        self.route, self.upstream, self.record = route, upstream, record
        self.ended = False

    def end(self, status: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.route.in_flight -= 1
        if status == CLIENT_GONE:
            self.upstream.close()  # drops the connection: the engine cancels the request
        else:
            self.upstream.release()
        self.record.done(status)


class EventStream(StreamingResponse):
    """Server-sent events passed through; the body's generator is closed however the response
    ends, so a client that went away closes the upstream request at once."""

    def __init__(self, body: AsyncIterator[bytes], passthrough: _Passthrough) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
        self._body, self._passthrough = body, passthrough

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()  # type: ignore[attr-defined]
            self._passthrough.end(CLIENT_GONE)  # nothing when the stream ended it


class UpstreamProxy:
    """One deployment's replicas behind the serving process (see the module docstring)."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        metrics: ServingMetrics,
        stats: ServingStats,
        *,
        down_seconds: float = 2.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
    ) -> None:
        self.routes = [_Route(replica) for replica in replicas]
        self.metrics, self.stats = metrics, stats
        self.down_seconds = down_seconds
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._turn = 0

    @property
    def ready(self) -> bool:
        return any(route.replica.state == READY for route in self.routes)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- forwarding --------------------------------------------------------------------------------

    async def forward(
        self, spec: ModelSpec, route: str, body: dict[str, Any], upstream_model: str
    ) -> Response:
        """``body`` (checked as JSON by the caller, its ``model`` the client's name for ``spec``)
        sent to a replica's ``/v1/<route>``; the engine's answer, or an error in OpenAI's shape."""
        if route not in ROUTES:
            raise ValueError(f"not an OpenAI generation route: {route}")
        record = _Record(self.metrics, self.stats, spec)
        client_model = str(body.get("model", ""))
        stream = body.get("stream") is True
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        payload = {**body, "model": upstream_model}
        if stream:
            payload["stream_options"] = {**(options or {}), "include_usage": True}
        data = orjson.dumps(payload)
        tried: list[_Route] = []
        failure: Response | None = None
        while len(tried) < 2:
            chosen = self._pick(tried)
            if chosen is None:
                break
            tried.append(chosen)
            chosen.in_flight += 1
            chosen.sent += 1
            try:
                upstream = await self._post(chosen, route, data)
            except UPSTREAM_ERRORS as exc:
                chosen.in_flight -= 1
                self._down(chosen)
                message = f"{chosen.replica.name} could not be reached: {exc or type(exc).__name__}"
                failure = error_response(502, message)
                record.failed = False  # not a decode: it never reached an engine
                continue
            if upstream.status >= 500:
                content = await _read_quietly(upstream)
                chosen.in_flight -= 1
                self._down(chosen)
                failure = _passed(upstream.status, content, upstream.content_type)
                record.failed = True  # the engine failed it (unless another replica answers)
                continue
            record.failed = False
            if stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
                passthrough = _Passthrough(chosen, upstream, record)
                events = self._events(passthrough, client_model, wants_usage)
                return EventStream(events, passthrough)
            try:
                return await self._whole(upstream, record, client_model)
            finally:
                chosen.in_flight -= 1
        if failure is None:
            record.failed = False
            reasons = "; ".join(r.replica.reason for r in self.routes if r.replica.reason)
            failure = error_response(503, f"no engine server is ready: {reasons or 'none'}")
        record.done(failure.status_code)
        return failure

    def _pick(self, tried: list[_Route]) -> _Route | None:
        """The usable replica with the fewest requests in flight (ties in turn); a replica only
        marked down by an earlier error is taken when no other is left."""
        now = time.monotonic()
        left = [r for r in self.routes if r not in tried and r.replica.state == READY]
        usable = [r for r in left if r.usable(now)] or left
        if not usable:
            return None
        self._turn += 1
        count = len(self.routes)
        return min(usable, key=lambda r: (r.in_flight, (self.routes.index(r) - self._turn) % count))

    def _down(self, route: _Route) -> None:
        route.down_until = time.monotonic() + self.down_seconds
        route.replica.suspect()

    async def _post(self, route: _Route, path: str, data: bytes) -> aiohttp.ClientResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
            )
        url = f"{route.replica.base_url}/v1/{path}"
        headers = {**route.replica.headers, "content-type": "application/json"}
        return await self._session.post(url, data=data, headers=headers)

    async def _whole(
        self, upstream: aiohttp.ClientResponse, record: _Record, client_model: str
    ) -> Response:
        try:
            content = await upstream.read()
        except UPSTREAM_ERRORS as exc:
            record.failed = True
            record.done(502)
            return error_response(502, f"the engine server broke off its answer: {exc}")
        finally:
            upstream.release()
        status, content_type = upstream.status, upstream.content_type
        answer = _json(content) if status == 200 else None
        if isinstance(answer, dict):
            if isinstance(answer.get("usage"), dict):
                record.usage(answer["usage"])
            for choice in answer.get("choices") or ():
                record.failed = record.failed or "\ufffd" in _choice_text(choice)
            if answer.get("model", client_model) != client_model:
                answer["model"] = client_model
                content = orjson.dumps(answer)
        record.done(status)  # not streamed: no first-token or per-token time
        return _passed(status, content, content_type)

    async def _events(
        self, passthrough: _Passthrough, client_model: str, wants_usage: bool
    ) -> AsyncIterator[bytes]:
        record, status, done, buffer = passthrough.record, CLIENT_GONE, False, b""
        try:
            try:
                async for piece in passthrough.upstream.content.iter_any():
                    buffer += piece
                    while (end := EVENT_END.search(buffer)) is not None:
                        raw, buffer = buffer[: end.start()], buffer[end.end() :]
                        sent, done = _event(raw, record, client_model, wants_usage, done)
                        if sent:
                            yield sent + b"\n\n"
                problem = "" if done else "the engine server ended the stream early"
            except UPSTREAM_ERRORS as exc:
                problem = f"the engine server broke off the stream: {exc or type(exc).__name__}"
            if problem:  # the client's stream still ends cleanly, with the reason
                self._down(passthrough.route)
                record.failed = True
                status = 500
                yield b"data: " + orjson.dumps(ApiError(502, problem, kind="server_error").body())
                yield b"\n\n" + DONE_EVENT
            else:
                status = 500 if record.failed else 200
        finally:
            passthrough.end(status)


def _event(
    raw: bytes, record: _Record, client_model: str, wants_usage: bool, done: bool
) -> tuple[bytes, bool]:
    """What one upstream event becomes for the client (b"" to drop it), and whether the stream
    is done. The event's bytes go on unchanged unless the model name must be put back."""
    data = b"\n".join(
        line[5:].lstrip(b" ") for line in raw.splitlines() if line.startswith(b"data:")
    )
    if not data:
        return raw, done
    if data.strip() == b"[DONE]":
        return raw, True
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        record.failed = True  # not JSON, or not UTF-8
        return raw, done
    if not isinstance(chunk, dict):
        return raw, done
    if "error" in chunk:
        record.failed = True
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        record.usage(usage)
    choices = chunk.get("choices")
    if not choices and isinstance(usage, dict) and not wants_usage:
        return b"", done  # the usage chunk only the proxy asked for
    for choice in choices or ():
        text = _choice_text(choice)
        if text:
            record.text(text)
    changed = False
    if "usage" in chunk and chunk["usage"] is None and not wants_usage:
        del chunk["usage"]  # the null each chunk carries once usage was asked for
        changed = True
    if "model" in chunk and chunk["model"] != client_model:
        chunk["model"] = client_model
        changed = True
    return (b"data: " + orjson.dumps(chunk) if changed else raw), done


def _json(content: bytes) -> object:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _choice_text(choice: object) -> str:
    if not isinstance(choice, dict):
        return ""
    text = choice.get("text")
    if text is None:
        holder = choice.get("delta") or choice.get("message") or {}
        text = holder.get("content") if isinstance(holder, dict) else None
    return text if isinstance(text, str) else ""


def _passed(status: int, content: bytes, content_type: str) -> Response:
    return Response(content, status, media_type=content_type or "application/json")


async def _read_quietly(upstream: aiohttp.ClientResponse) -> bytes:
    try:
        return await upstream.read()
    except UPSTREAM_ERRORS:
        return b""
    finally:
        upstream.release()
