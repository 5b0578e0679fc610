"""The scenario check (the source's scenario criterion: "passes the industry's specific test
cases"): a test-case dataset's cases, and the task metric on a golden set with expected outputs.

**Test cases** (``test_cases_dataset_id``, see :mod:`.test_cases`): every case is run on the engine
and judged by its check. The level passes when every case tagged ``must`` passes and the pass
rate reaches ``scenario_min_pass_rate``, by default the reference's pass rate on the same cases
scaled by ``min_retention`` (an engine with no FP32 ancestor is its own reference). Every failed
case is listed with what came back.

**Task metric** (a golden dataset with a target): the task's primary metric (or
``scenario_metric``) reaches ``scenario_threshold``, by default the reference's value scaled by
``min_retention``. Both are judged when both are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.backends import cache_root_for
from pipelines.certification._checks import LOWER_IS_BETTER
from pipelines.certification._state import CheckRecord, SuiteState
from pipelines.certification.test_cases import CaseReport, judge_all, parse_test_cases
from pipelines.core import PipelineError
from pipelines.engines import Engine, load_engine, run_rows


def _judge(engine: Engine, cases: list[Any]) -> CaseReport:
    return judge_all(cases, lambda feeds: run_rows(engine, feeds, cast=True), engine.inputs)


def _test_cases(s: SuiteState, c: CheckRecord) -> str:
    settings = s.settings
    assert settings.test_cases_dataset_id is not None
    ref = s.ctx.dataset(settings.test_cases_dataset_id, "test cases")
    cases = parse_test_cases(Path(ref.path))
    mine = _judge(s.loaded, cases)
    source = "scenario_min_pass_rate"
    threshold = settings.scenario_min_pass_rate
    if threshold is None:
        theirs = mine
        if s.reference is not None:
            engine = load_engine(s.reference, "cpu", cache_root_for(s.ctx.workdir))
            theirs = _judge(engine, cases)
            c.measure("reference.pass_rate", round(theirs.pass_rate, 6))
        threshold = theirs.pass_rate * settings.min_retention
        whose = "the reference's" if s.reference is not None else "its own (the FP32 reference)"
        source = f"{whose} {theirs.pass_rate:.2%} x min_retention {settings.min_retention:g}"
    failed = [r for r in mine.results if not r.passed]
    c.measure("pass_rate", round(mine.pass_rate, 6), round(threshold, 6), ">=")
    c.measure("must_passed", mine.must_passed, mine.must_total, ">=")
    c.measure("cases", len(mine.results))
    c.measure("cases_failed", len(failed))
    c.details["test_cases"] = {
        "dataset_id": settings.test_cases_dataset_id,
        "cases": len(cases),
        "by_tag": {tag: list(counts) for tag, counts in mine.by_tag.items()},
        "failed": [
            {"name": r.name, "check": r.check, "tags": list(r.tags), "got": r.got,
             "reason": r.reason}
            for r in failed
        ],
    }  # fmt: skip
    s.thresholds.update(scenario_min_pass_rate=threshold)
    must = f", {mine.must_passed}/{mine.must_total} must" if mine.must_total else ""
    return (
        f"{len(mine.results) - len(failed)}/{len(mine.results)} test cases passed "
        f"({mine.pass_rate:.2%}, needs {threshold:.2%}: {source}){must}"
    )


def _task_metric(s: SuiteState, c: CheckRecord) -> str:
    from pipelines.metrics import primary_metric, task_metrics

    targets = s.golden.targets
    assert targets is not None
    task = s.ctx.task
    metric = s.settings.scenario_metric or primary_metric(task)[0]
    higher_is_better = metric not in LOWER_IS_BETTER
    outputs = s.golden_outputs()
    computed = task_metrics(task, next(iter(outputs.values())), targets)
    if metric not in computed:
        raise PipelineError(
            f"metric {metric!r} is not computed for task {task}; it has {', '.join(computed)}"
        )
    value = computed[metric]
    threshold = s.settings.scenario_threshold
    source = "scenario_threshold"
    if threshold is None and s.reference is not None:
        ref_outputs = s.reference_outputs()
        theirs = task_metrics(task, next(iter(ref_outputs.values())), targets)[metric]
        c.measure(f"reference.{metric}", theirs)
        scale = s.settings.min_retention
        threshold = theirs * scale if higher_is_better else theirs / scale
        source = f"the reference's {theirs:.4g} scaled by min_retention {scale:g}"
    s.thresholds.update({"scenario_metric": metric, "scenario_threshold": threshold})
    if threshold is None:
        c.measure(metric, value)
        c.problems.append("no threshold")
        return (
            f"{metric} {value:.4g} on {s.golden.rows} rows, but there is no threshold: set "
            "scenario_threshold (the engine has no FP32 reference to derive one from)"
        )
    comparison = ">=" if higher_is_better else "<="
    passed = c.measure(metric, value, threshold, comparison)
    verdict = "meets" if passed else "misses"
    return (
        f"{metric} {value:.4g} on {s.golden.rows} golden rows {verdict} {threshold:.4g} ({source})"
    )


def check_scenario(s: SuiteState, c: CheckRecord) -> str:
    parts = []
    if s.settings.test_cases_dataset_id is not None:
        parts.append(_test_cases(s, c))
    if s.golden.targets is not None:
        parts.append(_task_metric(s, c))
    if not parts:  # refused before any check ran; kept for a direct caller
        raise PipelineError(
            "the scenario needs test cases or a golden dataset with a target to judge it on"
        )
    return "; ".join(parts)
