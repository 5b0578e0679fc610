"""The sensitivity search run for quantize: re-quantize with the costliest nodes kept in float.

:mod:`.sensitivity` ranks and searches; this module gives it what the stage has: the model as
it was handed to the quantizer, the mode's settings, rows to rank on, and a scorer (a function
from a candidate's file to the number held to ``min_retention``), so the dataset gate and the
generated-inputs judging use the same search. Static candidates reuse the first calibration's
activation ranges (onnxruntime's calibration cache), so each step costs one quantization and
one scoring, not a calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines.core import Artifact, PipelineContext, ProgressFn
from pipelines.judging import Judgement
from pipelines.onnx_io import first_error_line
from pipelines.quantization.checks import Made, check_runs
from pipelines.quantization.retention import Evaluation, measure_retention
from pipelines.quantization.settings import QuantizeSettings

__all__ = [
    "RANKING_ROWS",
    "Tuned",
    "keep_sensitive_in_float",
    "ranking_feeds",
    "search_on_dataset",
    "search_on_judgement",
]

logger = logging.getLogger(__name__)

# Rows the ranking runs the FP32 model on: enough to see a layer's activation range.
RANKING_ROWS = 16


@dataclass
class Tuned:
    """What the search settled on: the model written to ``out`` and the candidate it copies."""

    made: Made
    chosen: Path  # the candidate file the scorer judged (same content as ``out``)
    passed: bool
    score: float
    excluded: list[str]
    note: str


def ranking_feeds(
    ctx: PipelineContext, source: Artifact, s: QuantizeSettings, made: Made
) -> dict[str, np.ndarray]:
    """Rows to rank on: the first calibration batch, else the evaluation split's first rows,
    else inputs generated from the model's specs."""
    if made.check_feeds is not None:
        return {k: np.asarray(v)[:RANKING_ROWS] for k, v in made.check_feeds.items()}
    eval_id = s.effective_eval_dataset_id
    if eval_id is not None:
        from pipelines.datasets import load_split

        data = load_split(ctx.dataset(eval_id, "eval_dataset_id"), s.eval_split, source.inputs)
        if data.rows:
            return {k: np.asarray(v)[:RANKING_ROWS] for k, v in data.inputs.items()}
    from pipelines.judging import generated_inputs

    return generated_inputs(source.inputs, rows=RANKING_ROWS)[0]


def keep_sensitive_in_float(
    ctx: PipelineContext,
    source: Artifact,
    to_quantize: str,
    out: Path,
    scratch: Path,
    s: QuantizeSettings,
    external: bool,
    progress: ProgressFn,
    feeds: Mapping[str, np.ndarray],
    score: Callable[[Path], float],
    start: float,
    threshold: float | None = None,
) -> Tuned | None:
    """Search which nodes to keep in float; the chosen model is written to ``out``.

    None when there is nothing to search (no named weight nodes, or the ranking cannot run the
    model): the caller's all-quantized model stands. ``threshold`` is what the score must reach
    (default ``s.min_retention``). On failure to hold it within the cap, the best-scoring
    candidate is written when it beats ``start``.
    """
    from pipelines.quantization.int8 import (
        candidate_nodes,
        int8_dynamic,
        int8_static,
        reduce_range,
    )
    from pipelines.quantization.sensitivity import excluded_cap, rank_nodes, search

    candidates = candidate_nodes(to_quantize, s)
    cap = excluded_cap(len(candidates), s.max_excluded_fraction)
    if not candidates or cap == 0:
        return None
    progress(0.82, f"ranking {len(candidates)} weight nodes by their int8 error")
    try:
        ranked = rank_nodes(
            to_quantize,
            candidates,
            feeds,
            "dynamic" if s.mode == "int8_dynamic" else "static",
            s.effective_per_channel,
            reduce_range(s),
        )
    except Exception as exc:  # a model the one-node runs cannot take: no search, say why
        logger.warning("quantize: sensitivity ranking failed (%s)", first_error_line(exc))
        return None
    if not ranked:
        return None
    cache = scratch / "calibration-ranges.json"
    made_by: dict[Path, Made] = {}

    def make(excluded: list[str], path: Path | None = None) -> Path:
        target = path or scratch / f"excluded-{len(excluded)}.onnx"
        if s.mode == "int8_dynamic":
            made = int8_dynamic(source, to_quantize, target, s, external, excluded)
        else:
            made = int8_static(
                ctx, source, to_quantize, target, s, external, lambda *_: None, excluded, cache
            )
        made_by[target] = made
        return target

    def scored(path: Path) -> float:
        n = path.stem.rsplit("-", 1)[-1]
        progress(0.85, f"judging the model with {n} of {len(ranked)} weight nodes in float")
        return score(path)

    names = [r.name for r in ranked]
    wanted = s.min_retention if threshold is None else threshold
    result = search(names, make, scored, wanted, cap)
    if not result.excluded or (not result.passed and not result.score > start):
        return None
    chosen = scratch / f"excluded-{len(result.excluded)}.onnx"
    made = made_by[make(result.excluded, out)]
    made.meta["sensitivity_search"] = result.meta(ranked, start)
    shown = ", ".join(result.excluded[:5]) + (", ..." if len(result.excluded) > 5 else "")
    note = (
        f"sensitivity search kept {len(result.excluded)} of {len(ranked)} weight nodes in "
        f"float ({shown}): {result.describe(start)}"
    )
    if not result.passed:
        note += f"; the cap (max_excluded_fraction {s.max_excluded_fraction}) was reached"
    return Tuned(made, chosen, result.passed, result.score, result.excluded, note)


def search_on_dataset(
    ctx: PipelineContext,
    source: Artifact,
    artifact: Artifact,
    to_quantize: str,
    scratch: Path,
    s: QuantizeSettings,
    external: bool,
    progress: ProgressFn,
    made: Made,
    evaluation: Evaluation,
    eval_id: int,
) -> tuple[Made, Evaluation]:
    """The search behind quantize's dataset gate: each candidate scored by its retention on the
    evaluation split. The chosen model replaces ``artifact``'s file; its Made (the search's note
    and record added) and Evaluation are returned, else the caller's own."""
    judged: dict[Path, Evaluation] = {}

    def score(path: Path) -> float:
        candidate = replace(artifact, path=str(path))
        judged[path] = measure_retention(
            ctx, source, candidate, eval_id, s, made.providers, lambda *_: None
        )
        return judged[path].retention

    out = Path(artifact.path)
    feeds = ranking_feeds(ctx, source, s, made)
    tuned = keep_sensitive_in_float(
        ctx, source, to_quantize, out, scratch, s, external, progress, feeds, score,
        evaluation.retention,
    )  # fmt: skip
    if tuned is None:
        return made, evaluation
    return _adopted(tuned, source, out, s), judged[tuned.chosen]


def search_on_judgement(
    ctx: PipelineContext,
    source: Artifact,
    artifact: Artifact,
    to_quantize: str,
    scratch: Path,
    s: QuantizeSettings,
    external: bool,
    progress: ProgressFn,
    made: Made,
    judgement: Judgement,
    inputs: Mapping[str, np.ndarray] | None,
    device: str,
) -> tuple[Made, Judgement]:
    """The search behind quantize's judging where no task metric holds it: each candidate
    scored as the judgement scored the first one (top-1 agreement held to ``min_retention``,
    the minimum per-row cosine to ``min_cosine``), on the same rows, the parent run once."""
    from pipelines.judging import judge_against, reference_outputs

    reference = reference_outputs(
        source,
        inputs=inputs,
        judged_on=judgement.judged_on,
        rows=judgement.rows,
        dim_sizes=judgement.dims,
        dim_sources=judgement.dims_from,
    )
    judged: dict[Path, Judgement] = {}

    def score(path: Path) -> float:
        candidate = replace(artifact, path=str(path))
        judged[path] = judge_against(reference, candidate, ctx.task, device=device)
        return judged[path].value

    threshold = s.min_retention if judgement.metric == "agreement" else s.min_cosine
    out = Path(artifact.path)
    feeds = ranking_feeds(ctx, source, s, made)
    tuned = keep_sensitive_in_float(
        ctx, source, to_quantize, out, scratch, s, external, progress, feeds, score,
        judgement.value, threshold,
    )  # fmt: skip
    if tuned is None:
        return made, judgement
    return _adopted(tuned, source, out, s), judged[tuned.chosen]


def _adopted(tuned: Tuned, source: Artifact, out: Path, s: QuantizeSettings) -> Made:
    """The search's model, now at ``out``: its note added and checked to run as the first was."""
    tuned.made.notes = [*tuned.made.notes, tuned.note]
    tuned.made.max_abs_diff = check_runs(
        source, out, s.mode, tuned.made.providers, tuned.made.check_feeds
    )
    return tuned.made
