"""The parity check: the engine's outputs against its FP32 reference's on the golden set."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.certification._numerics import (
    abs_error,
    error_histogram,
    max_rel_error,
    normalised_statistic,
    row_cosine,
    tolerance_for,
)
from pipelines.certification._state import CheckRecord, NotRun, SuiteState
from pipelines.core import PipelineError, Precision


def check_parity(s: SuiteState, c: CheckRecord) -> str:
    precision = s.artifact.precision
    if s.reference is None:
        if precision == Precision.FP32.value:
            raise NotRun("this is the FP32 reference: it has no FP32 ancestor to compare with")
        c.problems.append("no FP32 ancestor")
        return (
            f"no FP32 ancestor of this {precision} engine runs here (ONNX or TorchScript), so "
            "its numbers cannot be checked; certify a model whose lineage has one"
        )
    outputs, expected = s.golden_outputs(), s.reference_outputs()
    pairs = _match_outputs(list(outputs), list(expected))
    histograms: dict[str, Any] = {}
    worst = 0.0
    tolerances: dict[str, Any] = {}
    for name, ref_name in pairs:
        if ref_name is None:
            c.problems.append(f"output {name!r} has no reference output")
            continue
        try:
            diff = abs_error(outputs[name], expected[ref_name])
        except ValueError as exc:
            c.problems.append(f"output {name!r}: {exc}")
            continue
        max_abs = float(diff.max()) if diff.size else 0.0
        worst = max(worst, max_abs)
        c.measure(f"{name}.max_abs_error", max_abs)
        c.measure(f"{name}.max_rel_error", max_rel_error(diff, expected[ref_name]))
        histograms[name] = error_histogram(diff)
        if precision != Precision.INT8.value:
            tolerance = tolerance_for(precision, name, s.settings.tolerances)
            tolerances[name] = tolerance.to_dict()
            stat = normalised_statistic(diff, expected[ref_name], tolerance)
            c.measure(f"{name}.normalised_error_{tolerance.statistic}", stat, 1.0, "<=")
    c.details["histograms"] = histograms
    c.details["outputs"] = {name: ref for name, ref in pairs}
    rows = s.golden.rows
    against = f"{s.reference.key} ({s.reference.format} fp32) on {rows} golden rows"
    if precision == Precision.INT8.value:
        text = f"{_int8_parity(s, c, pairs, outputs, expected)} against {against}"
        if c.failed and s.golden.generated:
            text += " (generated inputs: set golden_dataset_id to judge it on real data)"
        return text
    s.thresholds["tolerances"] = tolerances
    s.thresholds["parity"] = {"judged_by": "tolerance", "outputs": tolerances}
    failed = c.failed
    if failed:
        return f"outside tolerance against {against}: {', '.join(failed)}"
    return f"within tolerance of {against}; worst max abs error {worst:.3g}"


def _match_outputs(names: list[str], reference: list[str]) -> list[tuple[str, str | None]]:
    """Each engine output with the reference output of its name, else of its position."""
    pairs: list[tuple[str, str | None]] = []
    for index, name in enumerate(names):
        if name in reference:
            pairs.append((name, name))
        else:
            pairs.append((name, reference[index] if index < len(reference) else None))
    return pairs


def _int8_parity(
    s: SuiteState,
    c: CheckRecord,
    pairs: list[tuple[str, str | None]],
    outputs: dict[str, np.ndarray],
    expected: dict[str, np.ndarray],
) -> str:
    """INT8 on the task: metric retention with labels, else agreement or cosine.

    Records ``thresholds["parity"]`` and returns what was judged, with its value.
    """
    from pipelines.metrics import primary_metric, retention, task_metrics

    matched = [(n, r) for n, r in pairs if r is not None]
    if not matched:
        raise PipelineError("no engine output matches a reference output")
    first, ref_first = matched[0]
    task, threshold = s.ctx.task, s.settings.min_retention
    at_least = f"at least {threshold:.1%}"
    if s.golden.targets is not None:
        metric, higher_is_better = primary_metric(task)
        mine = task_metrics(task, outputs[first], s.golden.targets)[metric]
        theirs = task_metrics(task, expected[ref_first], s.golden.targets)[metric]
        kept = retention(mine, theirs, higher_is_better)
        c.measure(f"engine.{metric}", mine)
        c.measure(f"reference.{metric}", theirs)
        c.measure("retention", kept, threshold, ">=")
        judged = f"{metric} retention"
        text = f"{judged} {kept:.1%} ({metric} {mine:.4g} vs {theirs:.4g}; {at_least})"
    elif task == "classification":
        metrics = task_metrics(task, outputs[first], None, reference=expected[ref_first])
        c.measure("top1_agreement", metrics["agreement"], threshold, ">=")
        judged = "top-1 agreement"
        text = f"{judged} {metrics['agreement']:.1%} ({at_least})"
    else:
        worst = 1.0
        for name, ref_name in matched:
            cosine = row_cosine(outputs[name], expected[ref_name])
            c.measure(f"{name}.cosine", cosine, threshold, ">=")
            worst = min(worst, cosine)
        judged = "mean row cosine similarity"
        text = f"{judged} {worst:.4f} at worst (at least {threshold:g})"
    s.thresholds["parity"] = {"judged_by": judged, "min_retention": threshold}
    return text
