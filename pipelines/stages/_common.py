"""Helpers every stage uses; not part of the public stage API."""

from __future__ import annotations

from typing import Any, TypeVar

from pipelines.core import Artifact, PipelineError, StageSettings

S = TypeVar("S", bound=StageSettings)

# The file name of the model a stage writes into its stage directory.
ONNX_FILENAME = "model.onnx"


def coerce_settings(cls: type[S], settings: Any) -> S:
    """``settings`` as an instance of ``cls``: a dict (or None, for defaults) is validated.

    run_pipeline passes validated instances; this lets a notebook call ``stage.run(..., {})``.
    """
    if isinstance(settings, cls):
        return settings
    if settings is None:
        return cls()
    if isinstance(settings, StageSettings):
        settings = settings.model_dump()
    return cls.model_validate(settings)


def require_format(artifact: Artifact, stage: str, formats: tuple[str, ...]) -> None:
    """A PipelineError unless ``artifact`` is in one of ``formats``."""
    if artifact.format not in formats:
        wanted = " or ".join(formats)
        raise PipelineError(
            f"{stage} needs a {wanted} model but the current artifact {artifact.key!r} is "
            f"{artifact.format}"
        )


def settings_meta(settings: StageSettings) -> dict[str, Any]:
    """Settings as JSON-safe data, kept in an artifact's meta so a version says how it was made."""
    return settings.model_dump(mode="json")
