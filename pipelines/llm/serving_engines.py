"""The serving engine for a version's format: the one place that picks it.

See :mod:`pipelines.llm.serving_engine` for the interface both engines share.
"""

from __future__ import annotations

from pipelines.core import Artifact, ModelFormat, PipelineError
from pipelines.llm.serving_engine import DEFAULT_KV_CACHE_TOKENS, ServingEngine

__all__ = ["open_serving_engine"]


def open_serving_engine(
    artifact: Artifact,
    *,
    max_requests: int = 32,
    threads: int | None = None,
    kv_cache_tokens: int | None = DEFAULT_KV_CACHE_TOKENS,
    gather_s: float = 0.005,
    base: Artifact | None = None,
) -> ServingEngine:
    """The engine that serves ``artifact``'s format: transformers' continuous batching for a
    checkpoint and for a LoRA adapter over its ``base`` checkpoint (merged into one copy of
    the weights), ONNX Runtime GenAI's engine for its folders (``gather_s``: how long an idle
    one waits for more requests to start a batch with). PipelineError for other formats."""
    if artifact.format in (ModelFormat.HF_CHECKPOINT.value, ModelFormat.LORA_ADAPTER.value):
        from pipelines.llm.serving_transformers import TransformersServingEngine

        return TransformersServingEngine(
            artifact,
            max_requests=max_requests,
            threads=threads,
            kv_cache_tokens=kv_cache_tokens,
            base=base,
        )
    if artifact.format == ModelFormat.ORT_GENAI.value:
        from pipelines.llm.serving_ort import OrtGenaiServingEngine

        return OrtGenaiServingEngine(
            artifact, max_requests=max_requests, threads=threads, gather_s=gather_s
        )
    raise PipelineError(
        f"{artifact.key} is a {artifact.format} model: the serving engines run Hugging Face "
        "checkpoints, LoRA adapters over them and ONNX Runtime GenAI folders"
    )
