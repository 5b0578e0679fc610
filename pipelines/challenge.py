"""Champion/challenger: score two models on the same rows of a dataset with the task's metric.

A scheduled retraining run asks this once its challenger is certified: both models run over the
same evaluation split (the dataset's seeded permutation, so the rows are the ones every stage
sees), and the task's primary metric (``pipelines.metrics.primary_metric``) is computed for each.
Deciding what the numbers mean (the margin, the promotion) is the caller's business.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pipelines.core import Artifact, DatasetRef, PipelineError
from pipelines.datasets import load_split
from pipelines.engines import input_specs, predict
from pipelines.llm.kinds import TEXT_GENERATION
from pipelines.metrics import primary_metric, task_metrics

__all__ = ["Challenge", "challenge", "score"]

_BATCH = 64


@dataclass(frozen=True)
class Challenge:
    """Both scores on one split; ``margin_won`` applies the direction of the metric."""

    metric: str
    higher_is_better: bool
    champion: float
    challenger: float
    split: str
    rows: int

    def improvement(self) -> float:
        """How much better the challenger is, in the metric's units (negative: worse);
        for perplexity, the share by which it is lower (0.02: 2% lower than the champion's)."""
        delta = self.challenger - self.champion
        if self.metric == "perplexity":
            return -delta / self.champion
        return delta if self.higher_is_better else -delta

    def margin_won(self, margin: float) -> bool:
        """Whether the challenger beats the champion by at least ``margin``."""
        # A rounding hair under the margin (0.96 - 0.95 is 0.00999...) still counts as reaching it.
        return self.improvement() >= margin - 1e-12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score(
    artifact: Artifact, dataset: DatasetRef, split: str, task: str
) -> tuple[str, bool, float, int]:
    """(metric, higher_is_better, value, rows) of one model on a split of a dataset.

    The dataset needs a target column: without expected outputs there is nothing to tell a better
    model from a worse one. Raises PipelineError with the reason otherwise.
    """
    metric, higher_is_better = primary_metric(task)
    data = load_split(dataset, split, input_specs(artifact))  # an empty split is refused there
    if data.targets is None:
        raise PipelineError(
            f"dataset {dataset.id} has no target column, so {metric} cannot be computed on it"
        )
    # Every tensor format runs through the engine that serves it (TensorRT and AOTInductor too),
    # so the score is the served model's.
    outputs = predict(artifact, data.inputs, _BATCH)
    metrics = task_metrics(task, outputs, data.targets, top_k=(1,))
    value = metrics.get(metric)
    if value is None or not math.isfinite(value):
        raise PipelineError(f"{artifact.key} gives no finite {metric} on dataset {dataset.id}")
    return metric, higher_is_better, float(value), data.rows


def challenge(
    champion: Artifact,
    challenger: Artifact,
    dataset: DatasetRef,
    split: str,
    task: str,
    *,
    bases: tuple[Artifact | None, Artifact | None] = (None, None),
) -> Challenge:
    """Score ``champion`` and ``challenger`` on the same ``split`` of ``dataset`` for ``task``.

    Each model reads the split mapped onto its own inputs (an INT8 model and its FP32 parent may
    name them differently), so both see the same rows. A language model (``text-generation``)
    is scored by :func:`pipelines.llm.challenge_text.text_score` (test cases, else perplexity);
    ``bases`` are the champion's and the challenger's base checkpoints where one is a LoRA
    adapter. PipelineError when either cannot run.
    """
    if task == TEXT_GENERATION:
        from pipelines.llm.challenge_text import text_score

        metric, higher, champion_value, rows = text_score(champion, dataset, split, base=bases[0])
        _, _, challenger_value, _ = text_score(challenger, dataset, split, base=bases[1])
        return Challenge(metric, higher, champion_value, challenger_value, split, rows)
    metric, higher, champion_value, rows = score(champion, dataset, split, task)
    _, _, challenger_value, _ = score(challenger, dataset, split, task)
    return Challenge(metric, higher, champion_value, challenger_value, split, rows)
