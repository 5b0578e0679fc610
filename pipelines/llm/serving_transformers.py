"""A checkpoint served by transformers' continuous batching (iteration-level batching).

:class:`TransformersServingEngine` owns the checkpoint's model and tokenizer (opened by
:func:`~pipelines.llm.runtime.open_text_model`: local files only, never ``trust_remote_code``,
threads set explicitly, ``OMP_WAIT_POLICY=PASSIVE``) and a ``ContinuousBatchingManager``, whose
thread decodes every request in flight in one batch per step: a request joins or leaves the batch
between two steps. The engine is transformers'; this module only adapts it:

* Outputs come back through the manager's per-request result handler (run on the event loop
  with ``call_soon_threadsafe``), not its shared queue; they are cumulative, and become
  :class:`~pipelines.llm.serving_engine.Update` s of the tokens new since the last.
* Sampling is per request through the engine's per-request temperature and top-p processors.
  The manager samples (``do_sample``) for every request, so greedy decoding (temperature 0) is
  top-p 0, which keeps only the most likely token. The manager seeds one generator for all the
  requests of a batch, so a per-request seed cannot be honoured: callers refuse it.
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
        from transformers import ContinuousBatchingConfig, GenerationConfig

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
        # temperature and top_p here only make the manager build its per-request processors:
        # every request passes its own values (sampling_kwargs).
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

        self.manager.register_result_handler(request.request_id, handle)
        added = self.manager.add_request(
            prompt_ids,
            request_id=request.request_id,
            max_new_tokens=request.params.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(self.eos_token_ids) or -1,
            **sampling_kwargs(request.params),
        )
        if added is None:
            raise DecodeFailure(f"{self.key}'s engine is not taking requests")

    def _cancel(self, request: TextRequest) -> None:
        self.manager.cancel_request(request.request_id)
        self._release(request)

    def _release(self, request: TextRequest) -> None:
        """Drop the result handler: the manager removes it by itself only after a final
        output, which a cancel never sends."""
        router = self.manager.output_router
        with router._lock:
            router.result_handlers.pop(request.request_id, None)

    @property
    def failure(self) -> str | None:
        if self._closed or self.manager is None or self.manager.is_running():
            return None
        return "transformers' batching loop stopped (an error in a decoding step)"

    def batch_size(self) -> int:
        """Requests in the engine's current batch (read from another thread: a dict's size)."""
        manager = self.manager
        processor = manager.batch_processor if manager is not None else None
        return len(processor.scheduler.active_requests) if processor is not None else 0

    def _shutdown(self) -> None:
        self.manager.stop(block=True, timeout=60)
        self.manager = None
        self.text_model.close()
