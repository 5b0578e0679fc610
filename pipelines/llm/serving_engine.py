"""Serving a language model, many requests decoded together: transformers' continuous batching.

:class:`ServingEngine` owns a checkpoint's model, its tokenizer (opened by
:func:`~pipelines.llm.runtime.open_text_model`: local files only, never ``trust_remote_code``,
threads set explicitly, ``OMP_WAIT_POLICY=PASSIVE``) and a ``ContinuousBatchingManager``, whose
thread decodes every request in flight in one batch per step (iteration-level batching: a request
joins or leaves the batch between two steps). The engine is transformers'; this module only
adapts it to a server:

* :meth:`ServingEngine.submit` (on the event loop) adds a request and returns a
  :class:`TextRequest`, an async stream of :class:`StreamEvent` (new token ids, the text they
  add, the finish reason on the last). Outputs come back through the manager's per-request
  result handler (``call_soon_threadsafe``), not its shared queue.
* Text is detokenized incrementally and emitted only when it decodes cleanly, so a multi-byte
  character is never split between two events; bytes that never complete a character are
  emitted as U+FFFD at the end and the stream is marked ``invalid_utf8``.
* Stop strings are cut from the text (text that could begin one is held back) and stop the
  request in the engine.
* Sampling is per request through the engine's per-request temperature and top-p processors.
  The manager samples (``do_sample``) for every request, so greedy decoding (temperature 0) is
  top-p 0, which keeps only the most likely token. The manager seeds one generator for all the
  requests of a batch, so a per-request seed cannot be honoured: callers refuse it.
* An engine error (a failed step, a NaN in the logits that sampling rejects) fails the requests
  of that step: their stream raises :class:`DecodeFailure`.

torch and transformers are imported when an engine is opened, never when this module is.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.core import Artifact, ModelFormat, PipelineError
from pipelines.llm.runtime import open_text_model

__all__ = ["DecodeFailure", "SamplingParams", "ServingEngine", "StreamEvent", "TextRequest"]

FINISH_STOP, FINISH_LENGTH = "stop", "length"
# Tokens per KV-cache page: small, so a short request holds little of the cache.
PAGE_SIZE = 32
# Tokens a character's bytes can span in a byte-level vocabulary: text held back longer than
# this is not an unfinished character but invalid UTF-8.
MAX_CHAR_TOKENS = 4
REPLACEMENT = "\ufffd"
# KV-cache tokens an engine holds at most for all its requests together (about 2.3 GB for
# Gemma 3 270M); a long-context model would otherwise reserve a full context per request.
DEFAULT_KV_CACHE_TOKENS = 65536


class DecodeFailure(PipelineError):
    """A request the engine could not finish (an error in its loop, a NaN in the logits)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def engine_kwargs(self) -> dict[str, float]:
        """The per-request logits-processor arguments of the manager."""
        if self.temperature == 0:
            return {"temperature": 1.0, "top_p": 0.0}  # only the most likely token survives
        return {"temperature": float(self.temperature), "top_p": float(self.top_p)}


@dataclass
class StreamEvent:
    """What one step added to a request. ``finish_reason`` and ``invalid_utf8`` are set on the
    last event only; ``token_ids`` count every generated token (an end-of-sequence one too)."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    invalid_utf8: bool = False


class IncrementalText:
    """Token ids to text, emitted only once it decodes cleanly (offsets as vLLM keeps them)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # where the decoded window starts (a character boundary)
        self.read = 0  # tokens already emitted as text
        self.invalid = False

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

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
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.text = IncrementalText(engine.tokenizer)
        self.stops = StopStrings(params.stop)
        self.finished = False  # by the engine, a stop string, or a cancel
        self.in_engine = True  # until the engine's last output for it

    def deliver(self, output: Any) -> None:
        """The manager's result handler (run on the event loop)."""
        self.outputs.put_nowait(output)

    async def events(self) -> AsyncIterator[StreamEvent]:
        seen = 0
        try:
            while not self.finished:
                output = await self.outputs.get()
                while not self.outputs.empty():  # outputs are cumulative: the newest says all
                    output = self.outputs.get_nowait()
                if output.error is not None:
                    raise DecodeFailure(f"the engine failed on this request: {output.error}")
                new = [int(t) for t in output.generated_tokens[seen:]]
                seen += len(new)
                self.in_engine = not output.is_finished()
                text, stopped = self.stops.feed(self.text.add(new))
                if stopped or output.is_finished():
                    yield self._last(new, text, stopped, output.generated_tokens)
                    return
                if new:
                    yield StreamEvent(new, text)
        finally:
            self.cancel()

    def _last(self, new: list[int], text: str, stopped: bool, tokens: list[int]) -> StreamEvent:
        if not stopped:
            tail, stopped = self.stops.feed(self.text.finish())
            text += tail if stopped else tail + self.stops.flush()
        at_eos = bool(tokens) and int(tokens[-1]) in self.engine.eos_token_ids
        full = len(tokens) >= self.params.max_new_tokens
        reason = FINISH_STOP if stopped or at_eos or not full else FINISH_LENGTH
        return StreamEvent(new, text, reason, self.text.invalid)

    def cancel(self) -> None:
        """Stop decoding this request (a no-op once it has finished) and forget it."""
        if not self.finished:
            self.finished = True
            self.engine._forget(self.request_id, cancel=self.in_engine)


class ServingEngine:
    """A checkpoint decoded by transformers' continuous batching, for a serving process.

    ``max_requests``: requests decoded together at most (the pool's ``max_batch_size``); the
    KV cache holds that many requests at full context length, capped at ``kv_cache_tokens``
    tokens (never less than one request at full context); requests beyond it wait for room.
    """

    def __init__(
        self,
        artifact: Artifact,
        *,
        max_requests: int = 32,
        threads: int | None = None,
        kv_cache_tokens: int | None = DEFAULT_KV_CACHE_TOKENS,
    ) -> None:
        if artifact.format != ModelFormat.HF_CHECKPOINT.value:
            raise PipelineError(
                f"{artifact.key} is a {artifact.format} model: the serving engine runs Hugging "
                "Face checkpoints (ONNX Runtime GenAI folders and LoRA adapters are not served yet)"
            )
        from transformers import ContinuousBatchingConfig, GenerationConfig

        self.text_model: Any = open_text_model(artifact, threads=threads)
        self.tokenizer = self.text_model.tokenizer
        self.context_length: int = self.text_model.context_length
        self.eos_token_ids: set[int] = set(self.text_model.eos_token_ids)
        self.vocab_size = int(self.text_model.model.config.get_text_config().vocab_size)
        self.max_requests = max(1, max_requests)
        pages = math.ceil(self.context_length / PAGE_SIZE)
        blocks = self.max_requests * pages
        if kv_cache_tokens:  # a cap: at least one request at full context
            blocks = max(pages, min(blocks, math.ceil(kv_cache_tokens / PAGE_SIZE)))
        # temperature and top_p here only make the manager build its per-request processors:
        # every request passes its own values (SamplingParams.engine_kwargs).
        generation = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_p=0.5,
            max_new_tokens=self.context_length,
            eos_token_id=sorted(self.eos_token_ids) or -1,
            pad_token_id=self.text_model.pad_token_id,
        )
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=blocks,
            max_batch_tokens=max(256, min(self.context_length, 1024)),
            max_requests_per_batch=self.max_requests,
            per_request_processors=True,
            use_cuda_graph=False,
        )
        self.manager: Any = self.text_model.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        self.manager.start()
        self._requests: dict[str, TextRequest] = {}
        self._idle: asyncio.Event | None = None
        self._closed = False

    @property
    def key(self) -> str:
        return str(self.text_model.key)

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The messages through the checkpoint's chat template; PipelineError when it has none."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise PipelineError(f"{self.key}'s tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

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
        self.manager.register_result_handler(request.request_id, request.deliver)
        self._requests[request.request_id] = request
        added = self.manager.add_request(
            list(prompt_ids),
            request_id=request.request_id,
            max_new_tokens=params.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(self.eos_token_ids) or -1,
            **params.engine_kwargs(),
        )
        if added is None:
            request.cancel()
            raise DecodeFailure(f"{self.key}'s engine is not taking requests")
        return request

    def _forget(self, request_id: str, *, cancel: bool) -> None:
        """Cancel in the engine when it still decodes the request, and drop the result handler:
        the manager removes it by itself only after a final output, which a cancel never sends."""
        self._requests.pop(request_id, None)
        if self.manager is not None:
            if cancel:
                self.manager.cancel_request(request_id)
            router = self.manager.output_router
            with router._lock:
                router.result_handlers.pop(request_id, None)
        if not self._requests and self._idle is not None:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished or cancelled."""
        return len(self._requests)

    def batch_size(self) -> int:
        """Requests in the engine's current batch (read from another thread: a dict's size)."""
        processor = self.manager.batch_processor
        return len(processor.scheduler.active_requests) if processor is not None else 0

    async def drain(self) -> None:
        """Wait until every request in flight has finished (a hot swap retires the engine so)."""
        while self._requests:
            self._idle = asyncio.Event()
            await self._idle.wait()

    def close(self) -> None:
        """Stop the manager's thread and release the model. Blocking: call in a thread."""
        if self._closed:
            return
        self._closed = True
        self.manager.stop(block=True, timeout=60)
        self.manager = None
        self.text_model.close()
