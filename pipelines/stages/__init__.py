"""The stages a pipeline can use, and the check a pipeline passes before a job is queued.

``validate_pipeline`` runs in the web process when a user submits a pipeline, so this module and
the stage modules import no torch or onnxruntime at import time (the stages import them in run).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipelines.core import ModelFormat, Precision, Stage, StageConfigError, StageSettings
from pipelines.stages.benchmark import Benchmark, BenchmarkSettings
from pipelines.stages.compile import BACKENDS, Compile, CompileSettings
from pipelines.stages.evaluate import Evaluate, EvaluateSettings
from pipelines.stages.export_onnx import ExportOnnx, ExportOnnxSettings
from pipelines.stages.quantize import Quantize, QuantizeSettings

__all__ = [
    "BACKENDS",
    "MAX_STAGES",
    "REGISTRY",
    "Benchmark",
    "BenchmarkSettings",
    "Compile",
    "CompileSettings",
    "Evaluate",
    "EvaluateSettings",
    "ExportOnnx",
    "ExportOnnxSettings",
    "PlannedStage",
    "Quantize",
    "QuantizeSettings",
    "default_pipeline",
    "stage_schemas",
    "validate_pipeline",
]

# Stage name -> class; the names are what users write in a pipeline.
REGISTRY: dict[str, type[Stage]] = {
    cls.name: cls for cls in (ExportOnnx, Quantize, Compile, Benchmark, Evaluate)
}

# A longer pipeline is almost certainly a generated mistake, and every stage costs worker time.
MAX_STAGES = 20

# What a stage does to the model's precision, for the stages that change it, and the precisions
# a stage refuses. validate_pipeline follows these so that a second quantize fails at submission,
# not an hour into the job.
_OUTPUT_PRECISION: dict[str, str] = {Quantize.name: Precision.INT8.value}
_REFUSED_PRECISIONS: dict[str, tuple[str, ...]] = {Quantize.name: (Precision.INT8.value,)}

_DEFAULT_PIPELINES: dict[str, list[str]] = {
    ModelFormat.TORCHSCRIPT.value: [ExportOnnx.name, Quantize.name, Compile.name, Benchmark.name],
    ModelFormat.ONNX.value: [Quantize.name, Compile.name, Benchmark.name],
}


@dataclass(frozen=True)
class PlannedStage:
    """A stage of a validated pipeline: its id in the job, its name and its checked settings."""

    stage_id: str
    name: str
    settings: StageSettings

    @property
    def stage_class(self) -> type[Stage]:
        """The stage class that runs this step."""
        return REGISTRY[self.name]

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "settings"}`` as JSON-safe data, the form validate_pipeline takes back."""
        return {"name": self.name, "settings": self.settings.model_dump(mode="json")}


def stage_schemas() -> list[dict[str, Any]]:
    """Every stage's name, description, formats and settings JSON schema (GET /api/v1/stages)."""
    return [
        {
            "name": cls.name,
            "description": cls.description,
            "accepts": list(cls.accepts),
            "produces": cls.produces,
            "settings": cls.Settings.model_json_schema(),
        }
        for cls in REGISTRY.values()
    ]


def default_pipeline(source_format: str, precision: str | None = None) -> list[dict[str, Any]]:
    """The pipeline a model gets when the user picks none.

    TorchScript: export_onnx, quantize, compile, benchmark; ONNX: quantize, compile, benchmark.
    An upload that is already int8 (``precision``) is not quantized again.
    """
    names = _DEFAULT_PIPELINES.get(source_format)
    if names is None:
        raise StageConfigError(_unknown_format(source_format))
    return [
        {"name": name, "settings": {}}
        for name in names
        if precision not in _REFUSED_PRECISIONS.get(name, ())
    ]


def _unknown_format(source_format: str) -> str:
    known = ", ".join(f.value for f in ModelFormat)
    return f"unknown model format {source_format!r}; known formats: {known}"


def _a(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


def _settings_errors(where: str, exc: ValidationError) -> list[str]:
    """One line per pydantic error: ``stage 2 (quantize): mode: Input should be 'int8_dynamic'``."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"{where}: {field}: {error['msg']}")
    return lines


def _format_remedy(current: str, accepts: tuple[str, ...]) -> str:
    converters = [
        cls.name
        for cls in REGISTRY.values()
        if current in cls.accepts and cls.produces is not None and cls.produces in accepts
    ]
    if converters:
        return f"add {' or '.join(converters)} before it"
    return f"no stage converts {current} to {' or '.join(accepts)}"


def validate_pipeline(
    source_format: str, stages: list[dict[str, Any]], source_precision: str | None = None
) -> list[PlannedStage]:
    """Check a pipeline a user submitted and return its stages with validated settings.

    Each item is ``{"name": str, "settings": dict}`` (settings optional). The format (and
    precision) of the model is followed from stage to stage, so a stage that cannot take the
    model it would get is reported before anything runs. Every problem found is reported, one per
    line, in a single StageConfigError.
    """
    if source_format not in {f.value for f in ModelFormat}:
        raise StageConfigError(_unknown_format(source_format))
    known = ", ".join(REGISTRY)
    if not isinstance(stages, list):
        raise StageConfigError(
            'a pipeline is a list of stages such as [{"name": "quantize", "settings": {}}], '
            f"got {type(stages).__name__}"
        )
    if not stages:
        raise StageConfigError(f"the pipeline has no stages: add at least one of {known}")
    if len(stages) > MAX_STAGES:
        raise StageConfigError(
            f"the pipeline has {len(stages)} stages; at most {MAX_STAGES} are allowed"
        )

    errors: list[str] = []
    planned: list[PlannedStage] = []
    # None once a stage is unknown: what follows it cannot be followed, so it is not checked.
    fmt: str | None = source_format
    precision = source_precision
    for index, item in enumerate(stages, start=1):
        where = f"stage {index}"
        if not isinstance(item, dict):
            errors.append(
                f'{where}: expected {{"name": ..., "settings": {{...}}}}, got {type(item).__name__}'
            )
            fmt = None
            continue
        name = item.get("name")
        if not isinstance(name, str) or not name:
            errors.append(f'{where}: missing "name"; known stages: {known}')
            fmt = None
            continue
        cls = REGISTRY.get(name)
        if cls is None:
            close = difflib.get_close_matches(name, list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{where}: unknown stage {name!r}{hint}; known stages: {known}")
            fmt = None
            continue
        where = f"stage {index} ({name})"
        extra = sorted(set(item) - {"name", "settings"})
        if extra:
            errors.append(
                f'{where}: unknown key(s) {", ".join(extra)}; a stage has "name" and "settings"'
            )
        raw = item.get("settings")
        settings: StageSettings | None = None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            errors.append(f"{where}: settings must be an object, got {type(raw).__name__}")
        else:
            try:
                settings = cls.Settings.model_validate(raw)
            except ValidationError as exc:
                errors.extend(_settings_errors(where, exc))
        if fmt is not None and fmt not in cls.accepts:
            wanted = " or ".join(cls.accepts)
            errors.append(
                f"{where} needs {_a(wanted)} model but the model is {fmt} at that point: "
                f"{_format_remedy(fmt, cls.accepts)}"
            )
        elif precision is not None and precision in _REFUSED_PRECISIONS.get(name, ()):
            errors.append(
                f"{where}: the model is already {precision} at that point; remove this stage"
            )
        if cls.produces is not None and fmt is not None:
            fmt = cls.produces
        precision = _OUTPUT_PRECISION.get(name, precision)
        if settings is not None:
            planned.append(PlannedStage(f"{index:02d}-{name}", name, settings))

    if errors:
        raise StageConfigError("\n".join(errors))
    return planned
