"""ONNX Runtime GenAI's model builder run with the checkpoint's config read as it expects.

``python -m pipelines.llm.builder_child <the builder's arguments>`` is the builder's own command
line (``python -m onnxruntime_genai.models.builder``), run in this child process after one
change: transformers 5 reads Gemma 3's RoPE settings into ``rope_parameters`` nested by layer
type (``{"full_attention": {...}, "sliding_attention": {...}}``), while the builder (0.18) reads
them as transformers 4 wrote them (flat ``rope_parameters``, ``rope_theta``,
``rope_local_base_freq``) and stops with ``KeyError: 'rope_type'``. :func:`flat_rope` puts the
config back in that shape after it is loaded; nothing is written into the checkpoint. Any other
config passes through unchanged.
"""

from __future__ import annotations

import runpy
from typing import Any

BUILDER_MODULE = "onnxruntime_genai.models.builder"
_LAYER_TYPES = ("full_attention", "sliding_attention")


def flat_rope(config: Any) -> Any:
    """``config`` with per-layer-type RoPE parameters flattened (global, plus the local theta)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and set(params) <= set(_LAYER_TYPES) and _LAYER_TYPES[0] in params:
        full = dict(params[_LAYER_TYPES[0]])
        local = params.get(_LAYER_TYPES[1], full)
        config.rope_parameters = full
        config.rope_theta = full.get("rope_theta")
        config.rope_local_base_freq = local.get("rope_theta", config.rope_theta)
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        return flat_rope(load(*args, **kwargs))

    AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
    runpy.run_module(BUILDER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
