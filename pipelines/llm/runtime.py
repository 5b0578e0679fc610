"""Running a language model: greedy decoding with per-token times, and log-likelihoods.

:func:`open_text_model` opens an :class:`~pipelines.core.Artifact` of a text format as a
:class:`TextModel`, the one interface the text-generation stages (quantize, evaluate,
benchmark) use whatever runs underneath:

* **torch** (``hf_checkpoint``; ``lora_adapter`` over its ``base`` checkpoint through
  ``peft.PeftModel.from_pretrained``, not merged, so there is no second copy of the weights):
  ``AutoModelForCausalLM`` with ``local_files_only`` and never ``trust_remote_code``. Weights
  keep the checkpoint's dtype where this CPU computes it natively: bf16 is kept when oneDNN has
  bf16 kernels (``torch.ops.mkldnn._is_mkldnn_bf16_supported``; on the AVX512-BF16 workers a
  128-token prefill ran 2.3x faster than fp32 and a decode step as fast); fp16 is computed in
  float32 unless oneDNN has fp16 kernels (without them a 128-token fp16 matmul ran 4x slower
  than fp32). Decoding is a loop over ``model(...)`` with its KV cache (transformers 5's ``cache``
  argument; only the last position's logits are computed), so the first token and every next one
  are timed where they appear; a batch is left-padded, with an attention mask and explicit
  position ids.
* **ONNX Runtime GenAI** (``ort_genai``): ``og.Model`` / ``og.Generator``. The stored folder is
  read-only: threads go through ``og.Config(folder).overlay(...)`` (the decoder's session
  options), never into ``genai_config.json``. A batch is decoded together; ONNX Runtime GenAI
  derives its attention mask from the pad token, so prompts of different lengths are decoded in
  groups of one length (a real token equal to the pad id would otherwise be masked). The
  log-likelihood reads the generator's ``logits`` output after the prompt, which holds every
  position (the builder's graphs do not prune the LM head unless asked).

torch, transformers, peft and onnxruntime_genai are imported when a model is opened, never
when this module is. ``OMP_WAIT_POLICY=PASSIVE`` is set (unless set already) before torch
loads: spinning OpenMP threads made a busy 2-core worker 10x slower.
"""

from __future__ import annotations

import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core import Artifact, ModelFormat, PipelineContext, PipelineError
from pipelines.engines.base import BaseEngine, EngineOptions, EngineUnavailable, register_engine
from pipelines.llm.kinds import TEXT_GENERATION

__all__ = [
    "Generation",
    "OnToken",
    "TextModel",
    "open_in_context",
    "open_text_model",
    "text_parent",
]

#: Called after every decoding step with the step's index (0: the first token) and the token
#: each sequence of the batch produced (-1: it stopped already, or, with ONNX Runtime GenAI,
#: it is in another group of prompt length, decoded before or after this one).
OnToken = Callable[[int, list[int]], None]

RUNNABLE_FORMATS = (
    ModelFormat.HF_CHECKPOINT.value,
    ModelFormat.ORT_GENAI.value,
    ModelFormat.LORA_ADAPTER.value,
)
# Tokenizer files that make an adapter folder carry its own tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class Generation:
    """One sequence's greedy continuation: its new tokens (an end-of-sequence token that stopped
    it is not among them) and when they appeared. ``ttft_s`` is from the ``generate`` call to the
    first token; ``token_times_s`` the seconds from each token to the next."""

    tokens: list[int]
    ttft_s: float
    token_times_s: list[float] = field(default_factory=list)
    stopped_at_eos: bool = False

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None: one token or none)."""
        times = self.token_times_s
        return sum(times) / len(times) if times else None


def _set_passive_openmp() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _thread_count(threads: int | None) -> int:
    """Threads to run with, never left to the runtime: the setting, else R1_ENGINE_THREADS,
    else the CPUs this process may use."""
    n = EngineOptions(threads=threads).thread_count()
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class TextModel(BaseEngine):
    """A loaded language model (the ``text-generation`` engine family)."""

    family = TEXT_GENERATION

    def __init__(self, artifact: Artifact, threads: int) -> None:
        super().__init__(artifact, "cpu")
        self.threads = threads
        self.eos_token_ids: set[int] = set()
        self.pad_token_id = 0
        self.context_length = 0

    # -- what every runtime implements -----------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def negative_log_likelihood(self, ids: Sequence[int]) -> tuple[float, int]:
        """Sum of -log p(token i | tokens < i) for i = 1..n-1, and how many tokens that is."""
        raise NotImplementedError

    def _decode_batch(self, prompts: list[list[int]], new: int, run: _Decoding) -> None:
        """Decode ``prompts`` for up to ``new`` tokens, reporting each step to ``run``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (its memory goes back once nothing else holds it)."""
        gc.collect()

    # -- shared ------------------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: list[list[int]],
        max_new_tokens: int,
        on_token: OnToken | None = None,
        *,
        stop_at_eos: bool = True,
    ) -> list[Generation]:
        """Greedy continuations of a batch of prompts, decoded together.

        ``stop_at_eos`` False decodes ``max_new_tokens`` whatever comes (a benchmark's fixed
        output length). A prompt that leaves no room in the context is a PipelineError.
        """
        if not prompt_ids:
            return []
        if max_new_tokens < 1:
            raise PipelineError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        for ids in prompt_ids:
            if not ids:
                raise PipelineError("an empty prompt cannot be continued: give it a token")
            if len(ids) + max_new_tokens > self.context_length:
                raise PipelineError(
                    f"a prompt of {len(ids)} tokens plus {max_new_tokens} new ones exceeds "
                    f"{self.key}'s context of {self.context_length} tokens"
                )
        run = _Decoding(len(prompt_ids), self.eos_token_ids, stop_at_eos, on_token)
        self._decode_batch([list(map(int, p)) for p in prompt_ids], max_new_tokens, run)
        return run.generations

    def __enter__(self) -> TextModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if len(ids) > self.context_length:
            raise PipelineError(
                f"{len(ids)} tokens exceed {self.key}'s context of {self.context_length}; "
                "cut the text into windows (pipelines.llm.perplexity does)"
            )
        return ids


class _Decoding:
    """One ``generate`` call's bookkeeping: each sequence's tokens and times, who still runs."""

    def __init__(
        self, batch: int, eos: set[int], stop_at_eos: bool, on_token: OnToken | None
    ) -> None:
        self.started = self.last = time.perf_counter()
        self.generations = [Generation([], -1.0) for _ in range(batch)]
        self.active = [True] * batch
        self.eos, self.stop_at_eos, self.on_token = eos, stop_at_eos, on_token

    def step(self, index: int, tokens: list[int], rows: list[int] | None = None) -> bool:
        """Record step ``index``: ``tokens`` of sequences ``rows`` (default: all, in order);
        whether any of them still runs."""
        now = time.perf_counter()
        rows = list(range(len(tokens))) if rows is None else rows
        seen = [-1] * len(self.active)
        for i, token in zip(rows, tokens, strict=True):
            if not self.active[i]:
                continue
            seen[i] = token
            gen = self.generations[i]
            if gen.ttft_s < 0:
                gen.ttft_s = now - self.started
            else:
                gen.token_times_s.append(now - self.last)
            if self.stop_at_eos and token in self.eos:
                gen.stopped_at_eos, self.active[i] = True, False
            else:
                gen.tokens.append(token)
        self.last = now
        if self.on_token is not None:
            self.on_token(index, seen)
        return any(self.active[i] for i in rows)


class _TorchTextModel(TextModel):
    backend = "torch"

    def __init__(self, artifact: Artifact, threads: int, base: Artifact | None) -> None:
        _set_passive_openmp()
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        super().__init__(artifact, threads)
        torch.set_num_threads(threads)
        self.torch = torch
        weights = Path(base.path if base is not None else artifact.path)
        config = AutoConfig.from_pretrained(weights, local_files_only=True, trust_remote_code=False)
        self.dtype = _compute_dtype(torch, getattr(config, "dtype", None))
        model: Any = AutoModelForCausalLM.from_pretrained(
            weights, local_files_only=True, trust_remote_code=False, dtype=self.dtype
        )
        if base is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, artifact.path, is_trainable=False)
            self.backend = "torch-peft"
        self.model = model.eval()
        folder = artifact.path if _has_tokenizer(Path(artifact.path)) else weights
        self.tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
        self.context_length = _context_length(config, self.tokenizer)
        self.eos_token_ids = _eos_ids(config, self.tokenizer, weights)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))

    def encode(self, text: str) -> list[int]:
        # Long texts are cut into windows later: no warning about the model's maximum length.
        return [int(i) for i in self.tokenizer.encode(text, verbose=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def negative_log_likelihood(self, ids: Sequence[int]) -> tuple[float, int]:
        ids = self._check_ids(ids)
        if len(ids) < 2:
            return 0.0, 0
        torch = self.torch
        with torch.inference_mode():
            tensor = torch.tensor([ids])
            logits = self.model(input_ids=tensor, use_cache=False).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            picked = logp.gather(1, tensor[0, 1:, None])
        return float(-picked.sum()), len(ids) - 1

    def _decode_batch(self, prompts: list[list[int]], new: int, run: _Decoding) -> None:
        torch = self.torch
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_token_id] * (longest - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        with torch.inference_mode():
            for step in range(new):
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                cache = out.cache
                chosen = out.logits[:, -1, :].argmax(dim=-1)
                if not run.step(step, [int(t) for t in chosen.tolist()]):
                    break
                ids = chosen[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1

    def close(self) -> None:
        self.model = None
        super().close()


def _compute_dtype(torch: Any, stored: Any) -> Any:
    """The dtype to compute in on this CPU for a checkpoint stored in ``stored``."""
    name = str(stored or "float32").replace("torch.", "")
    if name == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    if name == "float16" and torch.ops.mkldnn._is_mkldnn_fp16_supported():
        return torch.float16
    return torch.float32


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _context_length(config: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10_000_000:
        return limit
    raise PipelineError("the checkpoint's config states no context length")


def _eos_ids(config: Any, tokenizer: Any, folder: Path) -> set[int]:
    """End-of-sequence ids: generation_config.json's, else the config's, else the tokenizer's."""
    found: Any = None
    generation = folder / "generation_config.json"
    if generation.is_file():
        found = json.loads(generation.read_text()).get("eos_token_id")
    if found is None:
        found = getattr(config, "eos_token_id", None)
    if found is None:
        found = tokenizer.eos_token_id
    values = found if isinstance(found, list) else [found]
    return {int(v) for v in values if v is not None}


class _OrtGenaiTextModel(TextModel):
    backend = "onnxruntime-genai"

    def __init__(self, artifact: Artifact, threads: int, engine_batch: int | None = None) -> None:
        _set_passive_openmp()
        import numpy as np
        import onnxruntime_genai as og

        super().__init__(artifact, threads)
        self.og, self.np = og, np
        folder = Path(artifact.path)
        genai = json.loads((folder / "genai_config.json").read_text())["model"]
        config = og.Config(str(folder))
        # The folder's own genai_config.json is never written: the overlay is in memory.
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        if engine_batch:  # requests og.Engine decodes together (its CPU batches are static)
            batching = {"static_batching": {"max_batch_size": int(engine_batch)}}
            config.overlay(json.dumps({"engine": batching}))
        config.clear_providers()  # the CPU: the platform builds ONNX Runtime GenAI models for it
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.context_length = int(genai.get("context_length") or 0)
        # A sliding-window model's KV cache must hold the window however short the sequence.
        window = (genai.get("decoder", {}).get("sliding_window") or {}).get("window_size")
        self.min_cache = int(window or 0)
        eos = genai.get("eos_token_id")
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos])}
        # ONNX Runtime GenAI's tokenizer leaves out the BOS token that tokenizer.json's post
        # processor (or add_bos_token) puts first; a model trained with it degrades without it.
        self.bos = _leading_bos(folder)
        pad = genai.get("pad_token_id")
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids, default=0))

    def encode(self, text: str) -> list[int]:
        ids = [int(i) for i in self.tokenizer.encode(text)]
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)  # as the checkpoint's own tokenizer does (Gemma, Llama)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(self.np.asarray(list(ids), dtype=self.np.int32)))

    def _generator(self, batch: int, max_length: int, min_length: int = 0) -> Any:
        """A greedy generator; its cache sized for ``max_length`` tokens, or the sliding window
        (the loops that use it stop at their own count, not at ``max_length``)."""
        cap = self.context_length or max_length
        max_length = max(max_length, min(self.min_cache, cap))
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=max_length, min_length=min_length, batch_size=batch, do_sample=False
        )
        return self.og.Generator(self.model, params)

    def negative_log_likelihood(self, ids: Sequence[int]) -> tuple[float, int]:
        np = self.np
        ids = self._check_ids(ids)
        if len(ids) < 2:
            return 0.0, 0
        generator = self._generator(1, len(ids))
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float64)
        del generator
        if logits.ndim != 3 or logits.shape[1] != len(ids):
            raise PipelineError(
                f"{self.key}'s model gives logits of shape {list(logits.shape)} for a prompt of "
                f"{len(ids)} tokens, not one per position (built with prune_lm_head?): its "
                "perplexity cannot be measured"
            )
        rows = logits[0, :-1]
        top = rows.max(axis=-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(rows - top).sum(axis=-1))
        picked = rows[np.arange(len(ids) - 1), ids[1:]]
        return float((logz - picked).sum()), len(ids) - 1

    def _decode_batch(self, prompts: list[list[int]], new: int, run: _Decoding) -> None:
        np = self.np
        groups: dict[int, list[int]] = {}
        for index, ids in enumerate(prompts):
            groups.setdefault(len(ids), []).append(index)
        for length, rows in groups.items():
            total = length + new
            # Without stopping, min_length keeps the end-of-sequence token from ending a sequence.
            generator = self._generator(len(rows), total, 0 if run.stop_at_eos else total)
            generator.append_tokens(np.asarray([prompts[i] for i in rows], dtype=np.int32))
            for step in range(new):
                generator.generate_next_token()
                tokens = [int(t) for t in np.asarray(generator.get_next_tokens()).reshape(-1)]
                if not run.step(step, tokens, rows) or generator.is_done():
                    break
            del generator

    def close(self) -> None:
        self.tokenizer = None
        self.model = None
        super().close()


def _leading_bos(folder: Path) -> int | None:
    """The token id the checkpoint's tokenizer puts before every text, if any."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        processor = json.loads((folder / "tokenizer.json").read_text()).get("post_processor")
    except (OSError, ValueError):
        processor = None
    if isinstance(processor, dict) and processor.get("type") == "TemplateProcessing":
        first = (processor.get("single") or [{}])[0]
        if "SpecialToken" in first:
            name = first["SpecialToken"].get("id")
            ids = (processor.get("special_tokens") or {}).get(name, {}).get("ids") or []
            return int(ids[0]) if len(ids) == 1 else None
        return None
    if config.get("add_bos_token"):
        genai = json.loads((folder / "genai_config.json").read_text())["model"]
        bos = genai.get("bos_token_id")
        return int(bos) if isinstance(bos, int) else None
    return None


def open_text_model(
    artifact: Artifact,
    *,
    threads: int | None = None,
    base: Artifact | None = None,
    engine_batch: int | None = None,
) -> TextModel:
    """``artifact`` loaded to run on the CPU with ``threads`` intra-op threads (None: the
    platform's default, see :func:`_thread_count`). A ``lora_adapter`` needs ``base``, the
    ``hf_checkpoint`` it was trained on. ``engine_batch``: for an ONNX Runtime GenAI folder
    served by ``og.Engine``, the requests it batches together. PipelineError when it cannot be
    loaded."""
    fmt = artifact.format
    if fmt not in RUNNABLE_FORMATS:
        hint = " (convert it to a checkpoint first)" if fmt == ModelFormat.GGUF.value else ""
        raise PipelineError(f"{artifact.key} is a {fmt} model, which no text runtime runs{hint}")
    folder = Path(artifact.path)
    if not folder.is_dir():
        raise PipelineError(f"cannot load {artifact.key}: its folder {folder} is missing")
    if fmt == ModelFormat.LORA_ADAPTER.value:
        if base is None or base.format != ModelFormat.HF_CHECKPOINT.value:
            raise PipelineError(
                f"{artifact.key} is a LoRA adapter: it runs over the checkpoint it was trained "
                "on, and no hf_checkpoint base was given"
            )
        if not Path(base.path).is_dir():
            raise PipelineError(f"cannot load {base.key}: its folder {base.path} is missing")
    elif base is not None:
        raise PipelineError(f"{artifact.key} is a {fmt} model; only a LoRA adapter takes a base")
    n = _thread_count(threads)
    try:
        if fmt == ModelFormat.ORT_GENAI.value:
            return _OrtGenaiTextModel(artifact, n, engine_batch)
        return _TorchTextModel(artifact, n, base)
    except PipelineError:
        raise
    except Exception as exc:
        from pipelines.onnx_io import first_error_line

        raise PipelineError(f"cannot load {artifact.key} ({fmt}): {first_error_line(exc)}") from exc


def text_parent(ctx: PipelineContext, artifact: Artifact) -> Artifact | None:
    """The nearest ancestor of ``artifact`` a text runtime can run (its folder present), or None.

    For a LoRA adapter that is its base checkpoint.
    """
    for found in ctx.lineage(artifact):
        if found.format in RUNNABLE_FORMATS and Path(found.path).is_dir():
            return found
    return None


def open_in_context(
    ctx: PipelineContext, artifact: Artifact, *, threads: int | None = None
) -> TextModel:
    """``artifact`` opened as :func:`open_text_model` does; a LoRA adapter over its base, the
    nearest checkpoint in its lineage."""
    base = None
    if artifact.format == ModelFormat.LORA_ADAPTER.value:
        base = next(
            (a for a in ctx.lineage(artifact) if a.format == ModelFormat.HF_CHECKPOINT.value), None
        )
        if base is None:
            raise PipelineError(
                f"{artifact.key} is a LoRA adapter and no checkpoint it descends from is known "
                "to this job, so it cannot be run"
            )
    return open_text_model(artifact, threads=threads, base=base)


def _engine(artifact: Artifact, device: str, options: EngineOptions) -> TextModel:
    """The engine registry's factory; the CPU whatever the device (``engine.device`` says)."""
    return open_text_model(artifact, threads=options.threads)


def _adapter_engine(artifact: Artifact, device: str, options: EngineOptions) -> TextModel:
    raise EngineUnavailable(
        f"{artifact.key} is a LoRA adapter: open it with its base checkpoint "
        "(pipelines.llm.runtime.open_in_context or open_text_model(..., base=...))"
    )


register_engine(ModelFormat.HF_CHECKPOINT.value, TEXT_GENERATION, _engine)
register_engine(ModelFormat.ORT_GENAI.value, TEXT_GENERATION, _engine)
register_engine(ModelFormat.LORA_ADAPTER.value, TEXT_GENERATION, _adapter_engine)
