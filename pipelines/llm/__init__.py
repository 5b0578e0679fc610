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

from pipelines.core import ModelFormat

__all__ = ["FOLDER_FORMATS", "MARKER", "TEXT_FORMATS", "TEXT_GENERATION", "is_text_format"]

#: The task and the engine family of language models.
TEXT_GENERATION = "text-generation"

#: The file that marks the root of each folder format (the stored tar's "model" member).
MARKER: dict[str, str] = {
    ModelFormat.HF_CHECKPOINT.value: "config.json",
    ModelFormat.ORT_GENAI.value: "genai_config.json",
    ModelFormat.LORA_ADAPTER.value: "adapter_config.json",
}

FOLDER_FORMATS = frozenset(MARKER)
TEXT_FORMATS = FOLDER_FORMATS | {ModelFormat.GGUF.value}


def is_text_format(fmt: str) -> bool:
    """Whether ``fmt`` is a language-model format (the text-generation family)."""
    return fmt in TEXT_FORMATS
