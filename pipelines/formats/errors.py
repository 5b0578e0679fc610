"""The inspector's result and its refusal."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.core import PipelineError, TensorSpec


class RejectedUpload(PipelineError):
    """An upload refused by the inspector; the message says why and what to upload instead.

    ``code`` is a short stable tag ("pickle", "tensorrt", "zip_bomb", ...) for logs and metrics;
    the message is what the user sees.
    """

    def __init__(self, message: str, code: str = "rejected") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class ModelInfo:
    """What :func:`pipelines.formats.inspect_model` learned about a file, without running it."""

    format: str  # a ModelFormat value
    precision: str  # a Precision value, guessed
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
