"""Language models (task and engine family ``text-generation``): checkpoints, GGUF, adapters.

A language model is a folder, not one file: a Hugging Face checkpoint (``config.json``,
safetensors shards, tokenizer files), an ONNX Runtime GenAI model folder, or a peft LoRA adapter
folder run over its base. The platform stores each as ONE tar (:mod:`pipelines.llm.folders`),
hashed like any file, and an :class:`~pipelines.core.Artifact` of these formats has the folder
as its ``path``. A GGUF file is the one single-file format; the worker converts it to a
checkpoint before anything runs it.

Nothing in this package imports torch, transformers or onnxruntime-genai at import time: the
web process inspects uploads with it, and the worker imports the runtimes inside the calls.
"""

from __future__ import annotations

from pipelines.llm.kinds import (
    FOLDER_FORMATS,
    MARKER,
    TEXT_FORMATS,
    TEXT_GENERATION,
    is_text_format,
)

__all__ = ["FOLDER_FORMATS", "MARKER", "TEXT_FORMATS", "TEXT_GENERATION", "is_text_format"]
