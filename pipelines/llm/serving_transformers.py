"""A checkpoint served by transformers' continuous batching (iteration-level batching).

:class:`TransformersServingEngine` owns the checkpoint's model and tokenizer (opened by
:func:`~pipelines.llm.runtime.open_text_model`: local files only, never ``trust_remote_code``,
threads set explicitly, ``OMP_WAIT_POLICY=PASSIVE``) and a ``ContinuousBatchingManager``, whose
thread decodes every request in flight in one batch per step: a request joins or leaves the batch
between two steps. The engine is transformers'; this module only adapts it:

* Outputs come back through the manager's per-request result handler (run on the event loop
  with ``call_soon_threadsafe``), not its shared queue; they are cumulative, and become
  :class:`~pipelines.llm.serving_engine.Update` s of the tokens new since the last.
* Two managers share the model's weights: greedy requests (temperature 0) go to one with no
  logits processors (the argmax), sampling requests to one made at the first of them, with
  per-request temperature and top-p processors. Its top-p sorts the whole vocabulary for every
  row of every step: on Gemma 3 (262,144 tokens), 16 greedy requests decoded 25.4 tokens/s
  through it and 47.3 without it. A manager seeds one generator for all the requests of a
  batch, so a per-request seed cannot be honoured: callers refuse it.
* A LoRA adapter is served over its base checkpoint with its weights merged in (peft's
  ``merge_and_unload``): the manager's batches run one set of weights, so adapters cannot share
  a base in one engine here (vLLM's multi-LoRA does that on GPU pools).
* The KV cache holds ``max_requests`` requests at full context length, capped at
  ``kv_cache_tokens`` tokens (never less than one request at full context); requests beyond it
  wait for room.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from pipelines.core import Artifact, ModelFormat, PipelineError
from pipelines.llm.runtime import open_text_model
from pipelines.llm.serving_engine import (
    DEFAULT_KV_CACHE_TOKENS,
    TRANSFORMERS_CB,
    DecodeFailure,
    SamplingParams,
    ServingEngine,
    TextRequest,
    Update,
)

__all__ = ["TransformersServingEngine"]

# Tokens per KV-cache page: small, so a short request holds little of the cache.
PAGE_SIZE = 32


class FiniteLogits:
    """A logits processor (kept by the managers' list as one that supports continuous batching)
    that raises on a NaN in a step's logits (-inf is a masked token, not a failure)."""

    supports_continuous_batching = True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if bool(torch.isnan(scores).any()):
            raise FloatingPointError("NaN in the logits")
        return scores


def sampling_kwargs(params: SamplingParams) -> dict[str, float]:
    """The per-request logits-processor arguments of the manager."""
    if params.greedy:
        return {"temperature": 1.0, "top_p": 0.0}  # only the most likely token survives
    return {"temperature": float(params.temperature), "top_p": float(params.top_p)}


class TransformersServingEngine(ServingEngine):
    """A checkpoint decoded by transformers' continuous batching."""

    name = TRANSFORMERS_CB

    def __init__(
        self,
        artifact: Artifact,
        *,
        max_requests: int = 32,
        threads: int | None = None,
        kv_cache_tokens: int | None = DEFAULT_KV_CACHE_TOKENS,
        base: Artifact | None = None,
    ) -> None:
        if artifact.format not in (ModelFormat.HF_CHECKPOINT.value, ModelFormat.LORA_ADAPTER.value):
            raise PipelineError(f"{artifact.key} is a {artifact.format} model, not a checkpoint")

        self.text_model: Any = open_text_model(artifact, threads=threads, base=base)
        if base is not None:  # the adapter's weights added into the base's: one copy, no peft
            self.text_model.model = self.text_model.model.merge_and_unload()
        super().__init__(str(self.text_model.key), max_requests)
        self.tokenizer = self.text_model.tokenizer
        self.context_length = int(self.text_model.context_length)
        self.eos_token_ids = set(self.text_model.eos_token_ids)
        self.vocab_size = int(self.text_model.model.config.get_text_config().vocab_size)
        pages = math.ceil(self.context_length / PAGE_SIZE)
        blocks = self.max_requests * pages
        if kv_cache_tokens:  # a cap: at least one request at full context
            blocks = max(pages, min(blocks, math.ceil(kv_cache_tokens / PAGE_SIZE)))
        self._blocks = blocks
        self._by_request: dict[str, Any] = {}  # the manager each request was given to
        # Greedy requests (temperature 0) go to a manager without logits processors; sampling
        # ones to a second, made at the first of them, with per-request temperature and top-p.
        self.manager: Any = self._manager(sampling=False)
        self.sampling_manager: Any = None

    def _manager(self, *, sampling: bool) -> Any:
        """A started manager over the model: greedy (no processors: its per-request top-p
        sorts the whole vocabulary for every row of every step, which halved the tokens/s of a
        Gemma 3 batch of 16 here) or sampling (per-request temperature and top-p)."""
        from transformers import ContinuousBatchingConfig, GenerationConfig

        # temperature and top_p here only make a sampling manager build its per-request
        # processors: every request passes its own values (sampling_kwargs).
        knobs = {"temperature": 0.5, "top_p": 0.5} if sampling else {}
        generation = GenerationConfig(
            do_sample=sampling,
            max_new_tokens=self.context_length,
            eos_token_id=sorted(self.eos_token_ids) or -1,
            pad_token_id=self.text_model.pad_token_id,
            **knobs,
        )
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=self._blocks,
            max_batch_tokens=max(256, min(self.context_length, 1024)),
            max_requests_per_batch=self.max_requests,
            per_request_processors=sampling,
            use_cuda_graph=False,
        )
        manager = self.text_model.model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=config
        )
        # A NaN in the logits fails the step (a decode failure) instead of an argmax of
        # garbage; sampling would fail on it too, in the sampler.
        processors = manager.logit_processor
        processors.logits_processor.append(FiniteLogits())
        processors.do_processing = True
        manager.start()
        return manager

    def _managers(self) -> list[Any]:
        return [m for m in (self.manager, self.sampling_manager) if m is not None]

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PipelineError(f"{self.key}'s tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]

    def _add(
        self, request: TextRequest, prompt_ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        seen = 0

        def handle(output: Any) -> None:  # on the loop: outputs hold every token so far
            nonlocal seen
            tokens = output.generated_tokens
            new, seen = [int(t) for t in tokens[seen:]], len(tokens)
            error = None if output.error is None else str(output.error)
            request.deliver(Update(new, output.is_finished(), None, error))

        if request.params.greedy:
            manager, knobs = self.manager, {}
        else:
            if self.sampling_manager is None:
                self.sampling_manager = self._manager(sampling=True)
            manager, knobs = self.sampling_manager, sampling_kwargs(request.params)
        self._by_request[request.request_id] = manager
        manager.register_result_handler(request.request_id, handle)
        added = manager.add_request(
            prompt_ids,
            request_id=request.request_id,
            max_new_tokens=request.params.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(self.eos_token_ids) or -1,
            **knobs,
        )
        if added is None:
            raise DecodeFailure(f"{self.key}'s engine is not taking requests")

    def _cancel(self, request: TextRequest) -> None:
        manager = self._by_request.get(request.request_id)
        if manager is not None:
            manager.cancel_request(request.request_id)
        self._release(request)

    def _release(self, request: TextRequest) -> None:
        """Drop the result handler: the manager removes it by itself only after a final
        output, which a cancel never sends."""
        manager = self._by_request.pop(request.request_id, None)
        if manager is None:
            return
        router = manager.output_router
        with router._lock:
            router.result_handlers.pop(request.request_id, None)

    @property
    def failure(self) -> str | None:
        if self._closed or all(m.is_running() for m in self._managers()):
            return None
        return "transformers' batching loop stopped (an error in a decoding step)"

    def batch_size(self) -> int:
        """Requests in the engine's current batches (read from another thread: dicts' sizes)."""
        total = 0
        for manager in self._managers():
            processor = manager.batch_processor
            total += len(processor.scheduler.active_requests) if processor is not None else 0
        return total

    def _shutdown(self) -> None:
        for manager in self._managers():
            manager.stop(block=True, timeout=60)
        self.manager = self.sampling_manager = None
        self.text_model.close()
