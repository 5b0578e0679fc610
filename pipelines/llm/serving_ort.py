"""An ONNX Runtime GenAI folder served by ONNX Runtime GenAI's own engine, ``og.Engine``.

The platform's INT8/INT4 versions are ONNX Runtime GenAI folders (the model builder's
MatMulNBits), so this is what serves them. ``og.Engine`` takes requests
(``create_request`` + ``Request.begin_turn`` with per-turn options: token cap, temperature,
top-p) and decodes them together; each ``Engine.run`` is one step and fills an event buffer with
the tokens it produced and the turns it finished (end of sequence, token cap, cancel, failure).

Facts this module is written around (ONNX Runtime GenAI 0.18, measured here):

* Every engine call must come from the thread that created the engine ("Engine operations must
  be called from the Engine owner thread"), so one driver thread owns the engine: the event loop
  hands it commands (add, cancel, stop) through a queue, and it hands each request its step's
  tokens back with ``call_soon_threadsafe``. ``Engine.run`` releases the GIL.
* On the CPU the engine schedules **static** batches of up to
  ``engine.static_batching.max_batch_size`` requests (set from the pool's ``max_batch_size``
  through an in-memory config overlay; the stored folder is never written): a request that
  arrives while a batch decodes waits until that whole batch has finished. Its continuous,
  paged batching needs a model built with paged attention, which the builder makes for CUDA only.
* So when the engine is idle, the first request waits ``gather_s`` (the pool's queue delay) for
  others to start the batch with it, as the tensor models' dynamic batcher does.
* A per-request seed needs the dynamic-batching engine: callers refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core import Artifact, ModelFormat, PipelineError
from pipelines.llm.runtime import open_text_model
from pipelines.llm.serving_engine import (
    FINISH_LENGTH,
    FINISH_STOP,
    ORT_GENAI_ENGINE,
    DecodeFailure,
    ServingEngine,
    TextRequest,
    Update,
)

__all__ = ["OrtGenaiServingEngine"]

# Events one Engine.run may report: a token per request in the batch, and its end.
EVENT_CAPACITY = 1024
START_TIMEOUT_S = 120.0


@dataclass
class _Live:
    """A request the driver thread has given the engine."""

    request: TextRequest
    loop: asyncio.AbstractEventLoop
    handle: Any  # og.Request
    turn: int


class OrtGenaiServingEngine(ServingEngine):
    """An ``ort_genai`` folder decoded by ``og.Engine`` on a driver thread of its own."""

    name = ORT_GENAI_ENGINE

    def __init__(
        self,
        artifact: Artifact,
        *,
        max_requests: int = 32,
        threads: int | None = None,
        gather_s: float = 0.005,
    ) -> None:
        if artifact.format != ModelFormat.ORT_GENAI.value:
            raise PipelineError(f"{artifact.key} is a {artifact.format} model, not ort_genai")
        import numpy as np
        import onnxruntime_genai as og

        self.og, self.np = og, np
        max_requests = max(1, max_requests)
        self.text_model: Any = open_text_model(artifact, threads=threads, engine_batch=max_requests)
        super().__init__(str(self.text_model.key), max_requests)
        self.context_length = int(self.text_model.context_length)
        self.eos_token_ids = set(self.text_model.eos_token_ids)
        genai = json.loads((Path(artifact.path) / "genai_config.json").read_text())["model"]
        self.vocab_size = int(genai.get("vocab_size") or 0)
        self._min_session = min(int(self.text_model.min_cache), self.context_length)
        self._detokenizer = _detokenizer(artifact)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._batch = 0
        self._dead: str | None = None
        self._closing: list[Any] = []  # cancelled requests, closed after the engine's next step
        self.gather_s = max(0.0, gather_s)
        self._thread = threading.Thread(target=self._drive, name=f"og-engine-{self.key}")
        self._thread.daemon = True
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or self._start_error is not None:
            self._commands.put(("stop",))
            self.text_model.close()
            raise PipelineError(f"ONNX Runtime GenAI's engine did not start: {self._start_error}")

    # -- the tokenizer -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.text_model.encode(text)]

    def decode(self, ids: list[int]) -> str:
        if self._detokenizer is not None:
            return str(self._detokenizer.decode(ids, skip_special_tokens=True))
        return str(self.text_model.decode(ids))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self.text_model.tokenizer
        try:
            text = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as exc:  # no template in the folder, or one it cannot render
            raise PipelineError(
                f"{self.key}'s tokenizer has no usable chat template: {exc}"
            ) from exc
        ids = [int(i) for i in tokenizer.encode(str(text))]
        return ids

    # -- the event loop's side -----------------------------------------------------------------

    def _add(
        self, request: TextRequest, prompt_ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        if self._dead is not None:
            raise DecodeFailure(f"{self.key}'s engine stopped: {self._dead}")
        self._commands.put(("add", request, prompt_ids, loop))

    def _cancel(self, request: TextRequest) -> None:
        self._commands.put(("cancel", request.request_id))

    @property
    def failure(self) -> str | None:
        return None if self._closed else self._dead

    def batch_size(self) -> int:
        """Requests in the engine's batch at its last step (read from another thread)."""
        return self._batch

    def _shutdown(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout=60)
        self.text_model.close()

    # -- the driver thread ---------------------------------------------------------------------

    def _drive(self) -> None:
        try:
            engine = self.og.Engine(self.text_model.model)
            buffer = engine.create_event_buffer(EVENT_CAPACITY)
        except BaseException as exc:  # the folder loads, but the engine refuses it
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        live: dict[str, _Live] = {}
        try:
            while self._take_commands(engine, live):
                if engine.has_pending_requests():
                    self._step(engine, buffer, live)
        except BaseException as exc:  # the engine is no longer healthy: fail what it held
            self._dead = str(exc) or type(exc).__name__
            for item in live.values():
                item.loop.call_soon_threadsafe(item.request.deliver, Update(error=self._dead))
            live.clear()
        finally:
            self._batch = 0
            for handle in [item.handle for item in live.values()] + self._closing:
                with contextlib.suppress(Exception):  # an event still pending, at shutdown
                    handle.close()

    def _take_commands(self, engine: Any, live: dict[str, _Live]) -> bool:
        """Apply every queued command; wait for one while the engine has nothing to do, then
        ``gather_s`` more for others to join the batch it starts (its batches are static: a
        request that comes a step later waits for the whole batch). False once told to stop."""
        idle = not engine.has_pending_requests()
        timeout: float | None = None
        deadline = 0.0
        while True:
            try:
                command = self._commands.get(block=idle, timeout=timeout)
            except queue.Empty:
                return True
            if idle and timeout is None:  # the first request of a new batch: gather others
                deadline = time.monotonic() + self.gather_s
            if idle:
                timeout = deadline - time.monotonic()
                idle = timeout > 0
            kind = command[0]
            if kind == "stop":
                for item in live.values():
                    item.handle.cancel_turn(item.turn)
                return False
            if kind == "add":
                self._begin(engine, live, *command[1:])
            elif kind == "cancel" and command[1] in live:
                item = live.pop(command[1])
                item.handle.cancel_turn(item.turn)
                self._closing.append(item.handle)

    def _begin(
        self,
        engine: Any,
        live: dict[str, _Live],
        request: TextRequest,
        prompt_ids: list[int],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        og, params = self.og, request.params
        try:
            # Its cache holds this request's tokens, not the model's whole context (but at
            # least a sliding window's: such a model's cache must hold the window).
            tokens = len(prompt_ids) + params.max_new_tokens
            limits = og.RequestOptions()
            limits.set_max_session_tokens(max(tokens, self._min_session))
            handle = engine.create_request(options=limits)
            options = og.TurnOptions(handle)
            options.set_max_generated_tokens(params.max_new_tokens)
            if params.greedy:
                options.set_temperature(0.0)
            else:
                options.set_do_sample(True)
                options.set_temperature(float(params.temperature))
                options.set_top_p(float(params.top_p))
                options.set_top_k(0)  # the folder's default top-k is not the API's
            turn = handle.begin_turn(self.np.asarray(prompt_ids, dtype=self.np.int32), options)
        except Exception as exc:
            loop.call_soon_threadsafe(request.deliver, Update(error=f"not accepted: {exc}"))
            return
        live[request.request_id] = _Live(request, loop, handle, int(turn))

    def _step(self, engine: Any, buffer: Any, live: dict[str, _Live]) -> None:
        """One ``Engine.run``: each request's new tokens, and its end, delivered once."""
        og = self.og
        engine.run(buffer)
        by_handle = {id(item.handle): key for key, item in live.items()}
        updates: dict[str, Update] = {}
        for event in buffer:
            key = by_handle.get(id(event.request))
            if key is None:
                continue  # a request cancelled meanwhile
            update = updates.setdefault(key, Update())
            flags = int(event.flags.value)
            if flags & int(og.EngineEventFlags.TOKEN.value) and event.token is not None:
                update.token_ids.append(int(event.token))
            if flags & int(og.EngineEventFlags.FAILED.value):
                update.done, update.error = True, f"{event.error_code.name}"
            elif flags & int(og.EngineEventFlags.TURN_FINISHED.value):
                update.done, update.reason = True, _reason(og, event.finish_reason)
                if event.finish_reason == og.FinishReason.FAILED:
                    update.error = f"{event.error_code.name}"
        self._batch = len(updates)
        for key, update in updates.items():
            item = live[key]
            if update.done:
                del live[key]
                item.handle.close()
            item.loop.call_soon_threadsafe(item.request.deliver, update)
        for handle in self._closing:
            handle.close()
        self._closing.clear()


def _detokenizer(artifact: Artifact) -> Any:
    """The folder's ``tokenizer.json`` opened with Hugging Face ``tokenizers``, for decoding:
    ONNX Runtime GenAI's own decode drops everything after bytes that are not UTF-8, where this
    one writes U+FFFD for them and goes on (a stream's text must not lose what follows). None
    when the folder has no ``tokenizer.json`` (its own tokenizer decodes then)."""
    path = Path(artifact.path) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _reason(og: Any, reason: Any) -> str | None:
    if reason in (og.FinishReason.EOS, og.FinishReason.STOP_STRING):
        return FINISH_STOP
    if reason in (og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS):
        return FINISH_LENGTH
    return None
