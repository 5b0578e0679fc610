"""Serving a language model: many requests decoded together by an existing engine.

A :class:`ServingEngine` is what the serving process holds per text-generation deployment. Two
engines sit behind it, chosen by the version's format
(:func:`pipelines.llm.serving_engines.open_serving_engine`):

* ``hf_checkpoint``: transformers' ``ContinuousBatchingManager``
  (:mod:`pipelines.llm.serving_transformers`), iteration-level batching: a request joins or
  leaves the batch between two decoding steps.
* ``ort_genai``: ONNX Runtime GenAI's ``og.Engine`` (:mod:`pipelines.llm.serving_ort`), the
  runtime the platform's INT8/INT4 versions are built for. On the CPU, ONNX Runtime GenAI 0.18
  schedules **static** batches (its paged, continuous batching is CUDA-only): requests that arrive
  while a batch decodes wait for it to end, then decode together.

This module holds what both share, so the HTTP routes see one interface:

* :meth:`ServingEngine.submit` (on the event loop) adds a request and returns a
  :class:`TextRequest`, an async stream of :class:`StreamEvent` (new token ids, the text they
  add, the finish reason on the last). An engine hands a request its progress as
  :class:`Update` s through :meth:`TextRequest.deliver`, on the event loop.
* Text is detokenized incrementally and emitted only when it decodes cleanly, so a multi-byte
  character is never split between two events; bytes that never complete a character are
  emitted as U+FFFD at the end and the stream is marked ``invalid_utf8``.
* Stop strings are cut from the text (text that could begin one is held back) and stop the
  request in the engine.
* An engine error (a failed step, a NaN in the logits that sampling rejects) fails the requests
  of that step: their stream raises :class:`DecodeFailure`.

torch, transformers and onnxruntime_genai are imported when an engine is opened, never when this
module is.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field

from pipelines.core import PipelineError

__all__ = [
    "DecodeFailure",
    "SamplingParams",
    "ServingEngine",
    "StreamEvent",
    "TextRequest",
    "Update",
]

FINISH_STOP, FINISH_LENGTH = "stop", "length"
# Tokens a character's bytes can span in a byte-level vocabulary: text held back longer than
# this is not an unfinished character but invalid UTF-8.
MAX_CHAR_TOKENS = 4
REPLACEMENT = "\ufffd"
# KV-cache tokens an engine holds at most for all its requests together (about 2.3 GB for
# Gemma 3 270M); a long-context model would otherwise reserve a full context per request.
DEFAULT_KV_CACHE_TOKENS = 65536
# Engine names, as the metrics and the benchmark call them.
TRANSFORMERS_CB, ORT_GENAI_ENGINE = "transformers-cb", "onnxruntime-genai"


class DecodeFailure(PipelineError):
    """A request the engine could not finish (an error in its loop, a NaN in the logits)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class StreamEvent:
    """What one step added to a request. ``finish_reason`` and ``invalid_utf8`` are set on the
    last event only; ``token_ids`` count every generated token (an end-of-sequence one too)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    invalid_utf8: bool = False


@dataclass
class Update:
    """What an engine tells a request: tokens new since the last update; on the last one,
    ``done``, and the engine's finish reason when it knows one, or the error that ended it."""

    token_ids: list[int] = field(default_factory=list)
    done: bool = False
    reason: str | None = None
    error: str | None = None


class IncrementalText:
    """Token ids to text, emitted only once it decodes cleanly (offsets as vLLM keeps them).

    ``decode`` turns ids into text without special tokens (the engine's tokenizer)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode_ids = decode
        self.ids: list[int] = []
        self.prefix = 0  # where the decoded window starts (a character boundary)
        self.read = 0  # tokens already emitted as text
        self.invalid = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.decode_ids(list(ids))

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        held = self._decode(self.ids[self.prefix : self.read])
        text = self._decode(self.ids[self.prefix :])
        if text.endswith(REPLACEMENT) and len(self.ids) - self.read < MAX_CHAR_TOKENS:
            return ""  # a character whose bytes have not all come yet
        delta = text[len(held) :]
        self.invalid = self.invalid or REPLACEMENT in delta
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def finish(self) -> str:
        """What is still held back: bytes that never completed a character."""
        held = self._decode(self.ids[self.prefix : self.read])
        delta = self._decode(self.ids[self.prefix :])[len(held) :]
        self.invalid = self.invalid or REPLACEMENT in delta
        self.prefix = self.read = len(self.ids)
        return delta


class StopStrings:
    """Cuts the text at the first stop string; holds back text that could begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit, and whether a stop string was reached (text after it is dropped)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self.hold
        if cut <= 0:
            return "", False
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextRequest:
    """One request in the engine: iterate :meth:`events`; :meth:`cancel` when giving up on it."""

    def __init__(self, engine: ServingEngine, request_id: str, params: SamplingParams) -> None:
        self.engine, self.request_id, self.params = engine, request_id, params
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self.text = IncrementalText(engine.decode)
        self.stops = StopStrings(params.stop)
        self.generated = 0  # tokens the engine produced for it so far
        self.last_token: int | None = None
        self.finished = False  # by the engine, a stop string, or a cancel
        self.in_engine = True  # until the engine's last update for it

    def deliver(self, update: Update) -> None:
        """An engine's progress report (called on the event loop)."""
        self.updates.put_nowait(update)

    def _next(self, first: Update) -> Update:
        """``first`` and every update already queued, as one."""
        merged = Update(list(first.token_ids), first.done, first.reason, first.error)
        while not merged.done and not self.updates.empty():
            more = self.updates.get_nowait()
            merged.token_ids += more.token_ids
            merged.done, merged.reason, merged.error = more.done, more.reason, more.error
        return merged

    async def events(self) -> AsyncGenerator[StreamEvent, None]:
        try:
            while not self.finished:
                update = self._next(await self.updates.get())
                if update.error is not None:
                    self.in_engine = False
                    raise DecodeFailure(f"the engine failed on this request: {update.error}")
                new = [int(t) for t in update.token_ids]
                self.generated += len(new)
                self.last_token = new[-1] if new else self.last_token
                self.in_engine = not update.done
                text, stopped = self.stops.feed(self.text.add(new))
                if stopped or update.done:
                    yield self._last(new, text, stopped, update.reason)
                    return
                if new:
                    yield StreamEvent(new, text)
        finally:
            self.cancel()

    def _last(self, new: list[int], text: str, stopped: bool, reason: str | None) -> StreamEvent:
        if not stopped:
            tail, stopped = self.stops.feed(self.text.finish())
            text += tail if stopped else tail + self.stops.flush()
        if stopped:
            reason = FINISH_STOP
        elif reason is None:
            at_eos = self.last_token is not None and self.last_token in self.engine.eos_token_ids
            full = self.generated >= self.params.max_new_tokens
            reason = FINISH_STOP if at_eos or not full else FINISH_LENGTH
        return StreamEvent(new, text, reason, self.text.invalid)

    def cancel(self) -> None:
        """Stop decoding this request (a no-op once it has finished) and forget it."""
        if not self.finished:
            self.finished = True
            self.engine._forget(self, cancel=self.in_engine)


class ServingEngine:
    """A text model decoded by an engine that batches requests, for a serving process.

    Subclasses set the tokenizer facts (``context_length``, ``eos_token_ids``, ``vocab_size``)
    and implement :meth:`encode`, :meth:`decode`, :meth:`chat_prompt`, :meth:`_add`,
    :meth:`_cancel`, :meth:`batch_size` and :meth:`_shutdown`.
    """

    name = "engine"

    def __init__(self, key: str, max_requests: int) -> None:
        self._key = key
        self.max_requests = max(1, max_requests)
        self.context_length = 0
        self.vocab_size = 0
        self.eos_token_ids: set[int] = set()
        self._requests: dict[str, TextRequest] = {}
        self._idle: asyncio.Event | None = None
        self._closed = False

    @property
    def key(self) -> str:
        return self._key

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Ids to text, special tokens left out."""
        raise NotImplementedError

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the model's chat template; PipelineError when it has none."""
        raise NotImplementedError

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> TextRequest:
        """Add a request to the batch; call from a coroutine on the loop that reads its events.

        PipelineError when it does not fit the context; DecodeFailure when the engine has
        stopped taking requests.
        """
        if not prompt_ids or len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise PipelineError(
                f"{len(prompt_ids)} prompt tokens and {params.max_new_tokens} new ones do not "
                f"fit the context of {self.context_length} tokens"
            )
        if self._closed:
            raise DecodeFailure(f"{self.key}'s engine is closed")
        request = TextRequest(self, uuid.uuid4().hex, params)
        self._requests[request.request_id] = request
        try:
            self._add(request, [int(i) for i in prompt_ids], asyncio.get_running_loop())
        except DecodeFailure:
            request.cancel()
            raise
        return request

    def _add(
        self, request: TextRequest, prompt_ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        """Hand the request to the engine, whose updates reach ``request.deliver`` on ``loop``."""
        raise NotImplementedError

    def _cancel(self, request: TextRequest) -> None:
        """Stop decoding a request the engine still holds."""
        raise NotImplementedError

    def _forget(self, request: TextRequest, *, cancel: bool) -> None:
        self._requests.pop(request.request_id, None)
        if not self._closed:
            self._cancel(request) if cancel else self._release(request)
        if not self._requests and self._idle is not None:
            self._idle.set()

    def _release(self, request: TextRequest) -> None:
        """Drop what the engine keeps for a request it finished (nothing by default)."""

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished or cancelled."""
        return len(self._requests)

    @property
    def failure(self) -> str | None:
        """Why the engine no longer decodes (its loop died), or None while it is healthy."""
        return None

    def batch_size(self) -> int:
        """Requests in the engine's current batch."""
        raise NotImplementedError

    async def drain(self) -> None:
        """Wait until every request in flight has finished (a hot swap retires the engine so)."""
        while self._requests:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def close(self) -> None:
        """Stop the engine and release the model. Blocking: call in a thread."""
        if self._closed:
            return
        self._closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        raise NotImplementedError
