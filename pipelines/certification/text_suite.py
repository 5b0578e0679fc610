"""The certification suite of a language model (the ``text-generation`` family).

:func:`run_text_suite` is what :func:`pipelines.certification.suite.run_suite` runs for a
``hf_checkpoint``, ``ort_genai`` or ``lora_adapter`` (over its base): the same report model, the
same three criteria, verdicts and levels as a tensor model's, with the checks that mean something
for generation. The golden set is a text dataset (``_text_state``). Twelve checks, in order:

1. **loads** on the profile's CPU (timed) and generates from a golden prompt.
2. **tokenizer**: ``decode(encode(text)) == text`` for the golden texts and a few non-ASCII
   probes; the share >= ``min_tokenizer_roundtrip`` (1.0).
3. **parity** with the nearest full-precision (fp32/bf16/fp16) ancestor checkpoint: perplexity on
   the golden texts at most ``max_ppl_increase`` (2%) above the ancestor's, on the same token
   ids, and greedy agreement over the first ``text_new_tokens`` (64) tokens of the golden
   prompts >= ``min_greedy_agreement``. A full-precision model without such an ancestor is the
   reference (NOT_RUN); a quantized one without it FAILs; a LoRA adapter is NOT_RUN (it is meant
   to differ from its base; the scenario judges it).
4. **finite**: no NaN or Inf in the logits of the golden prompts and their greedy continuations.
5. **determinism**: the greedy continuations of the golden prompts are identical over two runs.
6. **stops**: an end-of-sequence token is declared and decodes to no text; through the serving
   process, a stop string taken from a continuation cuts the next request's text right before
   it with finish_reason "stop", and finish reasons agree with max_tokens.
7. **context**: a prompt filling the context is refused by the model; through the serving
   process, a prompt over the context and a max_tokens past it get a 400
   ``context_length_exceeded``, and a request exactly at the limit is accepted.
8. **api_success** (the basic criterion) and 11. **qps** (the performance criterion, for a
   language model output tokens/s per card with TTFT p99 and TPOT budgets): one concurrent
   streaming load through the serving process (``_text_load``).
9. **performance**: one stream at a time on the model: TTFT p99 and TPOT p99 within the same
   budgets, peak memory <= ``max_memory_fraction`` of the device's.
10. **serving**: the serving process lists the model on ``/v1/models`` and its greedy answers
    (temperature 0) match the model's own greedy decoding, with the right usage counts.
12. **scenario**: a text test-case dataset (``test_cases_dataset_id``): every ``must`` case
    passes and the pass rate >= ``scenario_min_pass_rate``, by default the reference's (a LoRA
    adapter's base) x ``min_retention``.

Levels: basic runs 1-8, performance adds 9-11, scenario adds 12. The checks that go through the
serving process share one server, started on first use and stopped when the suite ends; where
none is registered (``python -m pipelines``) they judge the model alone or are NOT_RUN.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from pipelines.certification import _text_checks as checks_
from pipelines.certification._state import CheckRecord, check_sha256, not_run, run_check
from pipelines.certification._text_load import check_stream_qps, check_stream_success
from pipelines.certification._text_serving import check_context, check_serving, check_stops
from pipelines.certification._text_state import (
    TextSuiteState,
    describe_text_file,
    find_text_reference,
    load_text_golden,
)
from pipelines.certification.profiles import HardwareProfile
from pipelines.certification.report import (
    TEXT_CHECKS,
    TEXT_GENERATION,
    TEXT_LEVEL_CHECKS,
    TEXT_SUITE_VERSION,
    CheckId,
    CheckResult,
    CheckVerdict,
    Level,
    SuiteReport,
    criteria_of,
)
from pipelines.certification.settings import TENSOR_ONLY_SETTINGS, CertifySettings
from pipelines.core import Artifact, PipelineContext, PipelineError, ProgressFn

__all__ = ["TEXT_CHECK_FUNCTIONS", "run_text_suite"]

TEXT_CHECK_FUNCTIONS: dict[CheckId, Callable[[TextSuiteState, CheckRecord], str]] = {
    CheckId.LOADS: checks_.check_loads,
    CheckId.TOKENIZER: checks_.check_tokenizer,
    CheckId.PARITY: checks_.check_parity,
    CheckId.FINITE: checks_.check_finite,
    CheckId.DETERMINISM: checks_.check_determinism,
    CheckId.STOPS: check_stops,
    CheckId.CONTEXT: check_context,
    CheckId.API_SUCCESS: check_stream_success,
    CheckId.PERFORMANCE: checks_.check_performance,
    CheckId.SERVING: check_serving,
    CheckId.QPS: check_stream_qps,
    CheckId.SCENARIO: checks_.check_scenario,
}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _within(progress: ProgressFn, index: int) -> Callable[[float, str], None]:
    """The suite's progress from a check's own (the fraction of that check done)."""
    return lambda fraction, message: progress((index + fraction) / len(TEXT_CHECKS), message)


def _lowest_level(check_id: CheckId) -> Level:
    return next(level for level in Level if check_id in TEXT_LEVEL_CHECKS[level])


def run_text_suite(
    artifact: Artifact,
    ctx: PipelineContext,
    settings: CertifySettings,
    profile: HardwareProfile,
    progress: ProgressFn,
) -> SuiteReport:
    """Run every check of ``settings.level`` on the language model ``artifact`` on ``profile``.

    Raises PipelineError only when the suite cannot start: the stored file's sha256 differs from
    the one recorded, the golden dataset is not a text dataset, or the scenario level has no
    test-case dataset. Failed checks are verdicts in the report.
    """
    started_at = _now()
    level = Level(settings.level)
    engine_info = describe_text_file(artifact)
    check_sha256(artifact, engine_info)
    if level == Level.SCENARIO and settings.test_cases_dataset_id is None:
        raise PipelineError(
            "the scenario level of a language model judges a text test-case dataset: give "
            "test_cases_dataset_id (JSON Lines of prompt, expected, check; tags such as must)"
        )
    progress(0.0, "reading the golden texts")
    s = TextSuiteState(
        artifact=artifact,
        ctx=ctx,
        settings=settings,
        profile=profile,
        golden=load_text_golden(ctx, settings),
        thresholds=settings.model_dump(mode="json", exclude=set(TENSOR_ONLY_SETTINGS)),
        reference=find_text_reference(ctx, artifact),
    )
    checks: list[CheckResult] = []
    in_level = TEXT_LEVEL_CHECKS[level]
    try:
        for index, check_id in enumerate(TEXT_CHECKS):
            if check_id not in in_level:
                needs = _lowest_level(check_id).value
                summary = f"not part of the {level.value} level; it runs from the {needs} level"
                checks.append(not_run(check_id, summary, TEXT_CHECKS))
                continue
            if checks and checks[0].verdict == CheckVerdict.FAIL:
                checks.append(
                    not_run(check_id, "not run: the model did not load and generate", TEXT_CHECKS)
                )
                continue
            progress(index / len(TEXT_CHECKS), TEXT_CHECKS[check_id])
            s.progress = _within(progress, index)
            checks.append(run_check(check_id, s, TEXT_CHECK_FUNCTIONS, TEXT_CHECKS))
        if s.model is not None:
            engine_info["backend"] = s.model.backend
            engine_info["device"] = s.model.device
    finally:
        s.close()
    failed = [c for c in checks if c.id in in_level and c.verdict == CheckVerdict.FAIL]
    progress(1.0, "certification " + ("failed" if failed else "passed"))
    return SuiteReport(
        suite_version=TEXT_SUITE_VERSION,
        family=TEXT_GENERATION,
        level=level,
        verdict="failed" if failed else "passed",
        profile=profile.to_dict(),
        engine=engine_info,
        reference=describe_text_file(s.reference) if s.reference is not None else None,
        golden=s.golden.record,
        thresholds=s.thresholds,
        criteria=criteria_of(checks, TEXT_GENERATION),
        checks=checks,
        started_at=started_at,
        finished_at=_now(),
    )
