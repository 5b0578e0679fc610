"""The stages a pipeline can use, and the check a pipeline passes before a job is queued.

``validate_pipeline`` runs in the web process when a user submits a pipeline, so this module and
the stage modules import no torch or onnxruntime at import time (the stages import them in run).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pipelines.backends.settings import CompileSettings
from pipelines.certification.settings import CertifySettings
from pipelines.core import ModelFormat, StageConfigError, StageSettings
from pipelines.engines.tensor import TENSOR
from pipelines.finetuning.settings import FinetuneSettings
from pipelines.llm import TEXT_GENERATION, is_text_format
from pipelines.quantization.settings import QuantizeSettings
from pipelines.stages.base import Formats, Stage
from pipelines.stages.benchmark import Benchmark, BenchmarkSettings
from pipelines.stages.certify import Certify
from pipelines.stages.compile import BACKENDS, Compile
from pipelines.stages.evaluate import Evaluate, EvaluateSettings
from pipelines.stages.export_onnx import ExportOnnx, ExportOnnxSettings
from pipelines.stages.finetune import Finetune
from pipelines.stages.llm_benchmark import LlmBenchmark
from pipelines.stages.llm_evaluate import LlmEvaluate
from pipelines.stages.llm_finetune import LlmFinetune
from pipelines.stages.llm_from_gguf import FromGguf
from pipelines.stages.llm_quantize import LlmQuantize
from pipelines.stages.quantize import Quantize

__all__ = [
    "BACKENDS",
    "MAX_STAGES",
    "REGISTRY",
    "REGISTRIES",
    "Benchmark",
    "BenchmarkSettings",
    "Certify",
    "CertifySettings",
    "Compile",
    "CompileSettings",
    "Evaluate",
    "EvaluateSettings",
    "ExportOnnx",
    "ExportOnnxSettings",
    "Finetune",
    "FinetuneSettings",
    "PlannedStage",
    "Quantize",
    "QuantizeSettings",
    "Stage",
    "default_pipeline",
    "family_of",
    "registry_for",
    "stage_schemas",
    "validate_pipeline",
]

# Stage name -> class, per model family; the names are what users write in a pipeline, and a
# language model's "quantize" is another class than a tensor model's (the source format decides).
REGISTRY: dict[str, type[Stage[Any]]] = {
    cls.name: cls for cls in (ExportOnnx, Quantize, Compile, Benchmark, Evaluate, Finetune, Certify)
}
TEXT_REGISTRY: dict[str, type[Stage[Any]]] = {
    cls.name: cls
    for cls in (FromGguf, LlmFinetune, LlmQuantize, LlmEvaluate, LlmBenchmark, Certify)
}
REGISTRIES: dict[str, dict[str, type[Stage[Any]]]] = {
    TENSOR: REGISTRY,
    TEXT_GENERATION: TEXT_REGISTRY,
}

# A longer pipeline is almost certainly a generated mistake, and every stage costs worker time.
MAX_STAGES = 20

_DEFAULT_PIPELINES: dict[str, list[str]] = {
    ModelFormat.TORCHSCRIPT.value: [ExportOnnx.name, Quantize.name, Compile.name, Benchmark.name],
    ModelFormat.ONNX.value: [Quantize.name, Compile.name, Benchmark.name],
    # Language models: weight-only INT8 (ONNX Runtime GenAI), then perplexity and tokens/s.
    ModelFormat.HF_CHECKPOINT.value: ["quantize", "evaluate", "benchmark"],
    ModelFormat.GGUF.value: ["from_gguf", "quantize", "evaluate", "benchmark"],
    ModelFormat.ORT_GENAI.value: ["evaluate", "benchmark"],
    ModelFormat.LORA_ADAPTER.value: ["evaluate", "benchmark"],
}


def family_of(source_format: str) -> str:
    """The engine family of a model format: ``text-generation`` for language models."""
    return TEXT_GENERATION if is_text_format(source_format) else TENSOR


def registry_for(source_format: str) -> dict[str, type[Stage[Any]]]:
    """The stages a model of ``source_format`` can use, by name."""
    return REGISTRIES[family_of(source_format)]


@dataclass(frozen=True)
class PlannedStage:
    """A stage of a validated pipeline: its id in the job, its name and its checked settings."""

    stage_id: str
    name: str
    settings: StageSettings
    family: str = TENSOR

    @property
    def stage_class(self) -> type[Stage[Any]]:
        """The stage class that runs this step."""
        return REGISTRIES[self.family][self.name]

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "settings"}`` as JSON-safe data, the form validate_pipeline takes back."""
        return {"name": self.name, "settings": self.settings.model_dump(mode="json")}


def stage_schemas(family: str | None = None) -> list[dict[str, Any]]:
    """Every stage's name, family, description, formats and settings JSON schema (GET
    /api/v1/stages); those of one family when given."""
    return [
        {
            "name": cls.name,
            "family": fam,
            "description": cls.description,
            "accepts": list(cls.accepts),
            "produces": cls.produces,
            "settings": cls.Settings.model_json_schema(),
        }
        for fam, registry in REGISTRIES.items()
        if family is None or fam == family
        for cls in registry.values()
    ]


def default_pipeline(source_format: str, precision: str | None = None) -> list[dict[str, Any]]:
    """The pipeline a model gets when the user picks none.

    TorchScript: export_onnx, quantize, compile, benchmark; ONNX: quantize, compile, benchmark;
    a Hugging Face checkpoint: weight-only INT8 (quantize), evaluate, benchmark; GGUF: from_gguf
    first. An upload that is already int8 (``precision``) is not quantized again.
    """
    names = _DEFAULT_PIPELINES.get(source_format)
    if names is None:
        raise StageConfigError(_unknown_format(source_format))
    # A stage that would refuse the model's precision at that point (quantize, for an int8
    # upload) is left out; the precision is followed (from_gguf leaves a float checkpoint).
    registry = registry_for(source_format)
    stages: list[dict[str, Any]] = []
    for name in names:
        left, refusal = registry[name].precision_for(None, precision)
        if refusal is None:
            stages.append({"name": name, "settings": {}})
            precision = left
    return stages


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


# A stage whose formats depend on its settings (compile: on its backend) says so through
# ``accepts_for`` / ``produces_for`` (a tuple: one of these, decided on the worker), and
# ``narrow_for`` gives the settings that make only some formats, used when a later stage takes
# only those (compile "auto" followed by evaluate becomes compile "onnxruntime"). Its class-level
# ``accepts``/``produces`` stay the summary stage_schemas shows.


def _stage_formats(
    cls: type[Stage[Any]], settings: StageSettings | None
) -> tuple[tuple[str, ...], Formats]:
    """(accepts, produces) of a stage with these settings; None settings: its defaults."""
    if settings is None:
        try:
            settings = cls.Settings()
        except ValidationError:
            return cls.accepts, cls.produces
    return tuple(cls.accepts_for(settings)), cls.produces_for(settings)


def _possible(fmt: Formats) -> tuple[str, ...]:
    if fmt is None:
        return ()
    return (fmt,) if isinstance(fmt, str) else fmt


def _narrow(planned: list[PlannedStage], index: int | None, formats: tuple[str, ...]) -> bool:
    """Make planned[index] produce only ``formats`` (its ``narrow_for``); whether it could."""
    if index is None or index >= len(planned):
        return False
    step = planned[index]
    settings = step.stage_class.narrow_for(step.settings, formats)
    if settings is None:
        return False
    planned[index] = PlannedStage(step.stage_id, step.name, settings, step.family)
    return True


def _format_remedy(
    current: str, accepts: tuple[str, ...], registry: dict[str, type[Stage[Any]]]
) -> str:
    converters = []
    for cls in registry.values():
        takes, gives = _stage_formats(cls, None)
        if current in takes and isinstance(gives, str) and gives in accepts:
            converters.append(cls.name)
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
    family = family_of(source_format)
    registry = REGISTRIES[family]
    known = ", ".join(registry)
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
    fmt: Formats = source_format
    decided_by, decided_at = "", None  # the stage that made fmt, and its index in planned
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
        cls = registry.get(name)
        if cls is None:
            close = difflib.get_close_matches(name, list(registry), n=1)
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
        accepts, produces = _stage_formats(cls, settings)
        # What the stage does to the precision (quantize: its mode's) and whether it takes it.
        left, refusal = cls.precision_for(settings, precision)
        taken = tuple(f for f in _possible(fmt) if f in accepts)
        if len(_possible(fmt)) > 1 and taken and _narrow(planned, decided_at, taken):
            fmt = taken[0] if len(taken) == 1 else taken
        refused = [f for f in _possible(fmt) if f not in accepts]
        if refused:
            wanted = " or ".join(accepts)
            if len(_possible(fmt)) > 1:
                remedy = (
                    f"the format after {decided_by} depends on the worker; set {decided_by}'s "
                    "backend so it is known"
                )
            else:
                remedy = _format_remedy(refused[0], accepts, registry)
            by_setting = cls.format_hint(settings) if settings is not None else None
            if by_setting is not None:
                remedy += f" ({by_setting})"
            errors.append(
                f"{where} needs {_a(wanted)} model but the model is "
                f"{' or '.join(_possible(fmt))} at that point: {remedy}"
            )
        elif refusal is not None:
            errors.append(f"{where}: {refusal}")
        if produces is not None and fmt is not None:
            fmt = produces
            decided_by, decided_at = name, (len(planned) if settings is not None else None)
        precision = left
        if settings is not None:
            planned.append(PlannedStage(f"{index:02d}-{name}", name, settings, family))

    if errors:
        raise StageConfigError("\n".join(errors))
    return planned
