"""evaluate: task metrics of the current model on a dataset split, and retention vs its parent."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator

from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
    TensorSpec,
)
from pipelines.stages.base import Stage, StageOutcome, settings_meta

__all__ = ["Evaluate", "EvaluateSettings"]

TopK = Annotated[int, Field(ge=1, le=1000)]

# The formats evaluate runs (through pipelines.engines.predict); an ancestor in another format
# (a compiled engine) is passed over when looking for a parent to compare with.
_RUNNABLE: tuple[str, ...] = (ModelFormat.ONNX.value, ModelFormat.TORCHSCRIPT.value)


class EvaluateSettings(StageSettings):
    """Settings of evaluate."""

    dataset_id: int = Field(
        ...,
        ge=1,
        description="The dataset to evaluate on (its id); the model's inputs are read from it.",
    )
    split: Literal["validation", "test", "train", "all"] = Field(
        "validation",
        description=(
            "Which rows: the dataset's validation, test or train split (cut by its fractions "
            "and seed, the same in every job), or all of them."
        ),
    )
    batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Rows per model call. A model whose batch dim is fixed runs at that size.",
    )
    top_k: list[TopK] = Field(
        default_factory=lambda: [1, 5],
        min_length=1,
        max_length=10,
        description=(
            "Classification: also report top-k accuracy for these k (k = 1 is accuracy; k not "
            "below the number of classes is skipped)."
        ),
    )

    @field_validator("top_k")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        return sorted(set(value))


def _same_specs(a: list[TensorSpec], b: list[TensorSpec]) -> bool:
    return [(s.name, list(s.shape), s.dtype) for s in a] == [
        (s.name, list(s.shape), s.dtype) for s in b
    ]


def runnable_parent(ctx: PipelineContext, artifact: Artifact) -> Artifact | None:
    """The nearest ancestor of ``artifact`` (following ``parent``) that can be run, or None."""
    seen = {artifact.key}
    key = artifact.parent
    while key is not None and key not in seen and key in ctx.artifacts:
        seen.add(key)
        candidate = ctx.artifacts[key]
        if candidate.format in _RUNNABLE and Path(candidate.path).is_file():
            return candidate
        key = candidate.parent
    return None


def _percent(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value * 100:.1f}%"


class Evaluate(Stage[EvaluateSettings]):
    """Compute task metrics of the current model on a dataset, and its retention vs its parent."""

    name: ClassVar[str] = "evaluate"
    description: ClassVar[str] = (
        "Evaluate the current model on a dataset split with the task's metrics (accuracy and "
        "top-k, mse/mae, or cosine similarity), and compare it with the nearest model it was "
        "made from (retention of the primary metric)."
    )
    Settings: ClassVar[type[StageSettings]] = EvaluateSettings
    accepts: ClassVar[tuple[str, ...]] = _RUNNABLE
    produces: ClassVar[str | None] = None

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: EvaluateSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Evaluate the current artifact; metrics go into its ``metrics``, it stays current."""
        from pipelines.datasets import load_split
        from pipelines.engines import input_specs, predict
        from pipelines.metrics import primary_metric, task_metrics
        from pipelines.quantization.retention import compare_with_parent

        current = ctx.current_artifact
        ref = ctx.dataset(s.dataset_id, "evaluate dataset_id")
        progress(0.0, f"loading the {s.split} split of dataset {ref.id}")

        specs = input_specs(current)
        data = load_split(ref, s.split, specs)
        if data.rows == 0:
            raise PipelineError(
                f"the {s.split} split of dataset {ref.id} has no rows; pick another split or "
                "give it a larger fraction"
            )
        parent = runnable_parent(ctx, current)
        fraction_model = 0.45 if parent is not None else 0.9

        def scaled(lo: float, span: float, what: str) -> Any:
            return lambda f: progress(lo + span * f, f"{what}: {f * 100:.0f}% of rows")

        outputs = predict(
            current, data.inputs, s.batch_size, scaled(0.05, fraction_model, current.key)
        )
        parent_outputs = None
        if parent is not None:
            parent_specs = input_specs(parent)
            parent_data = (
                data if _same_specs(parent_specs, specs) else load_split(ref, s.split, parent_specs)
            )
            parent_outputs = predict(
                parent, parent_data.inputs, s.batch_size, scaled(0.5, 0.45, parent.key)
            )

        if data.targets is None and parent_outputs is None:
            raise PipelineError(
                f"dataset {ref.id} has no target column (label, target or y; or set its target) "
                f"and {current.key!r} has no parent model to compare with, so there is nothing "
                "to evaluate against"
            )
        top_k = tuple(s.top_k)
        primary, higher_is_better = primary_metric(ctx.task)
        # With a parent, classification also reports "agreement" (same top-1 class); without
        # targets the parent's outputs are what the child is compared with.
        kept: float | None = None
        parent_metrics: dict[str, float] = {}
        if parent_outputs is None:
            metrics = task_metrics(ctx.task, outputs, data.targets, top_k)
        else:
            compared = compare_with_parent(
                ctx.task, outputs, parent_outputs, data.targets, (primary, higher_is_better), top_k
            )
            metrics, parent_metrics, kept = (
                compared.metrics,
                compared.parent_metrics,
                compared.retention,
            )
        result: dict[str, float] = dict(metrics)
        notes: list[str] = []
        if data.targets is not None:  # without targets the parent is the reference itself
            result.update({f"parent_{k}": v for k, v in parent_metrics.items()})
        if kept is not None:
            result["retention"] = kept
        result["eval_rows"] = float(data.rows)
        # Metrics are stored as JSON and logged to MLflow: a NaN (a model that outputs NaN)
        # is left out and said so in the message instead.
        bad = sorted(k for k, v in result.items() if not math.isfinite(v) and k != "retention")
        if bad:
            notes.append(f"not finite, left out: {', '.join(bad)}")
        result = {k: float(v) for k, v in result.items() if k not in bad}
        if "retention" in result and not math.isfinite(result["retention"]):
            notes.append("retention is infinite (the parent scores 0), left out")
            del result["retention"]

        current.metrics.update(result)
        current.meta["evaluation"] = {
            "stage_id": stage_id,
            "dataset_id": s.dataset_id,
            "split": s.split,
            "task": ctx.task,
            "primary_metric": primary,
            "parent": parent.key if parent is not None else None,
            "settings": settings_meta(s),
        }
        progress(1.0, "evaluated")

        shown = primary if primary in result else next(iter(metrics), primary)
        message = f"{data.rows} {s.split} rows"
        if shown in result:
            message = f"{shown} {result[shown]:.4f} on {message}"
        if parent is not None and f"parent_{shown}" in result:
            message += f"; parent {result[f'parent_{shown}']:.4f}"
        if "retention" in result:
            message += f"; retention {_percent(result['retention'])}"
        if parent is None:
            message += "; no parent model to compare with"
        elif "agreement" in result:
            message += f"; agrees with {parent.key} on {result['agreement'] * 100:.1f}% of rows"
        if notes:
            message += "; " + "; ".join(notes)
        return StageOutcome(metrics=result, message=message)
