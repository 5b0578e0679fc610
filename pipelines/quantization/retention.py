"""A model against the model it was made from, on the same rows: task metrics and retention.

The one place both evaluate and quantize score a child next to its parent. The child is scored
with the parent's outputs as its reference (classification adds ``agreement``, the share of rows
whose top-1 class matches); where the rows have no targets, the parent is scored against itself
the same way, so ``agreement`` and ``cosine`` read 1.0 for it. Retention is the child's value of
one metric over the parent's (:func:`pipelines.metrics.retention`).

Quantize's gate (:func:`measure_retention`) runs both models here through ``pipelines.engines``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.core import Artifact, PipelineContext, PipelineError, ProgressFn
from pipelines.judging import pct
from pipelines.quantization.settings import QuantizeSettings

__all__ = [
    "Comparison",
    "Evaluation",
    "Unmeasurable",
    "compare_with_parent",
    "measure_retention",
    "pct",
]


@dataclass
class Comparison:
    """Task metrics of a child and its parent on the same rows, and the retention of one."""

    metrics: dict[str, float]
    parent_metrics: dict[str, float]
    metric: str
    higher_is_better: bool
    # None when one of the two has no value of ``metric`` (no targets for it).
    retention: float | None


def compare_with_parent(
    task: str,
    outputs: np.ndarray,
    parent_outputs: np.ndarray,
    targets: np.ndarray | None,
    metric: tuple[str, bool],
    top_k: tuple[int, ...] = (1, 5),
) -> Comparison:
    """Score ``outputs`` and ``parent_outputs`` for ``task``; retention of ``metric`` (name,
    whether higher is better)."""
    from pipelines.metrics import retention, task_metrics

    metrics = task_metrics(task, outputs, targets, top_k, parent_outputs)
    parent_metrics = task_metrics(
        task, parent_outputs, targets, top_k, parent_outputs if targets is None else None
    )
    name, higher_is_better = metric
    kept = None
    if name in metrics and name in parent_metrics:
        kept = float(retention(metrics[name], parent_metrics[name], higher_is_better))
    return Comparison(metrics, parent_metrics, name, higher_is_better, kept)


class Unmeasurable(PipelineError):
    """The eval split has no targets and the task's metric has no form against the parent."""


class JudgeOnRows(Unmeasurable):
    """An embedding's rows have no targets: the model is judged against its parent on them
    (``pipelines.judging``: the least per-row cosine, held to ``min_cosine``), not by a mean."""


@dataclass
class Evaluation:
    """Quantize's gate: the metric of the new model and of its parent on the eval split."""

    metric: str
    higher_is_better: bool
    value: float
    parent: float
    retention: float
    rows: int
    dataset_id: int
    split: str

    def describe(self) -> str:
        kept = f"{pct(self.retention)} kept" if math.isfinite(self.retention) else "parent at 0"
        return (
            f"{self.metric} {self.parent:.4f} -> {self.value:.4f} ({kept}) "
            f"on {self.rows} {self.split} rows of dataset {self.dataset_id}"
        )


def _candidate_outputs(
    candidate: Artifact, inputs: dict[str, np.ndarray], providers: Sequence[str]
) -> np.ndarray:
    """The new model's first output on every row."""
    from pipelines.engines import first_output, predict, run_rows

    if not any(t.dtype == "bfloat16" for t in candidate.inputs):
        return predict(candidate, inputs)
    # bf16 inputs (keep_io_types off): loaded on the provider that runs bf16, the rows cast to
    # bfloat16 once ml_dtypes has registered it with numpy.
    import ml_dtypes  # noqa: F401

    from pipelines.quantization.checks import model_engine

    engine = model_engine(candidate, providers)
    out = first_output(engine, run_rows(engine, inputs, cast=True))
    return np.asarray(out, np.float32)


def measure_retention(
    ctx: PipelineContext,
    source: Artifact,
    candidate: Artifact,
    dataset_id: int,
    s: QuantizeSettings,
    providers: Sequence[str],
    progress: ProgressFn,
) -> Evaluation:
    """The primary metric of ``ctx.task`` for the parent and the new model on the eval split.

    Without targets in the dataset, classification is judged on ``agreement`` with the parent's
    top-1 class and embedding on ``cosine`` to the parent's outputs (the parent scores 1.0 on
    both); regression and other tasks have nothing to compare with (Unmeasurable).
    """
    from pipelines.datasets import load_split
    from pipelines.engines import predict
    from pipelines.metrics import primary_metric

    ref = ctx.dataset(dataset_id, "eval_dataset_id")
    name, higher_is_better = primary_metric(ctx.task)
    data = load_split(ref, s.eval_split, source.inputs)
    if data.rows == 0:
        raise PipelineError(
            f"evaluation dataset {dataset_id} has no {s.eval_split} rows; pick another "
            "eval_split or dataset"
        )
    if data.targets is None:
        if ctx.task == "classification":
            name, higher_is_better = "agreement", True
        elif ctx.task == "embedding":
            # A mean cosine hides the rows INT8 breaks (a transformer kept 0.997 on average
            # with rows at 0.95): the judgement holds the least row instead.
            raise JudgeOnRows(f"evaluation dataset {dataset_id} has no target column")
        else:
            raise Unmeasurable(
                f"evaluation dataset {dataset_id} has no target column, and {name} "
                f"({ctx.task}) needs one"
            )
    progress(0.8, f"measuring {name} of the parent on {data.rows} {s.eval_split} rows")
    parent_out = predict(source, data.inputs)
    progress(0.9, f"measuring {name} of the {s.mode} model")
    child_out = _candidate_outputs(candidate, data.inputs, providers)
    compared = compare_with_parent(
        ctx.task, child_out, parent_out, data.targets, (name, higher_is_better)
    )
    if compared.retention is None:
        raise Unmeasurable(f"{name} cannot be measured on dataset {dataset_id}")
    return Evaluation(
        metric=name,
        higher_is_better=higher_is_better,
        value=float(compared.metrics[name]),
        parent=float(compared.parent_metrics[name]),
        retention=compared.retention,
        rows=data.rows,
        dataset_id=dataset_id,
        split=s.eval_split,
    )
