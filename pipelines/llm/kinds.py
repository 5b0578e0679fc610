"""The language-model formats and family name, imported by the package's modules and callers."""

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
