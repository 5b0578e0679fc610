"""What every text-generation route of the serving process shares, whatever its wire format.

The OpenAI-compatible routes (``openai_api``) and the Open Inference Protocol's generate
extension (``generate_api``) read a body, turn a prompt into token ids that fit the model's
context, submit them to the model's engine and record the same numbers when the request ends:
those steps live here once, so both APIs refuse the same input and count the same metrics.
Errors are :class:`~r1platform.serving.openai_protocol.ApiError` (a status, a message and the
parameter at fault); each API writes them in its own error shape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipelines.core import PipelineError
from pipelines.llm.serving_engine import SamplingParams, ServingEngine, StreamEvent
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.openai_protocol import ApiError, TextCall
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats

CLIENT_GONE = 499  # the status counted for a stream whose client disconnected


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


class Tracker:
    """One generation request's numbers, recorded once when it ends."""

    def __init__(
        self,
        metrics: ServingMetrics,
        stats: ServingStats,
        spec: ModelSpec,
        engine: ServingEngine,
        started: float,
    ) -> None:
        self.metrics, self.stats, self.spec, self.engine = metrics, stats, spec, engine
        self.started = started
        self.labels = (spec.label, str(spec.version))
        self.tokens = 0
        self.first = self.last = 0.0
        self.invalid = False
        self.recorded = False
        # The series exists (at 0) from a version's first request: rate() sees no increase in a
        # counter's first sample, so a series born at 1 would hide the first failure from
        # ServingDecodeFailures.
        metrics.text.decode_failures.labels(*self.labels)

    def event(self, event: StreamEvent) -> None:
        if event.token_ids:
            self.last = time.perf_counter()
            self.first = self.first or self.last
            self.tokens += len(event.token_ids)
            self.metrics.text.batch_size.labels(self.spec.label).observe(self.engine.batch_size())
        self.invalid = self.invalid or event.invalid_utf8

    def done(self, status: int, prompt_tokens: int, failed: bool = False) -> None:
        if self.recorded:
            return
        self.recorded = True
        text, elapsed = self.metrics.text, time.perf_counter() - self.started
        self.metrics.requests.labels(*self.labels, str(status)).inc()
        self.stats.observe(self.spec, status, elapsed)
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body; 413 as soon as it is over ``limit`` (declared or read)."""
    declared = request.headers.get("content-length", "")
    body = bytearray()
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the {limit} byte limit")
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the {limit} byte limit")
    return bytes(body)


def prompt_ids(engine: ServingEngine, call: TextCall) -> list[int]:
    """The call's prompt as token ids (chat messages through the model's template)."""
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


def sampling_params(
    engine: ServingEngine, call: TextCall, prompt_tokens: int, param: str | None = None
) -> SamplingParams:
    """The request's sampling; 400 when the prompt and max_tokens do not fit the context.

    ``param`` names the prompt in errors (default: ``messages`` or ``prompt``); ``max_tokens``
    None takes every token the context has room for.
    """
    context = engine.context_length
    param = param or ("messages" if call.chat else "prompt")
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
