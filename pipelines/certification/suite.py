"""The certification suite: the checks an engine passes on one hardware profile.

This is the tensor family's suite; a language model (``hf_checkpoint``, ``ort_genai``,
``lora_adapter``) runs :mod:`.text_suite` instead, which fills the same report (its checks, its
three criteria, the same levels and verdicts).

:func:`run_suite` loads the engine on the profile's device and runs every check of
``report.CHECKS`` in order; each records what it measured against its threshold as
:class:`~pipelines.certification.report.Measurement` s and gives a verdict. A check that raises is
a FAIL whose summary holds the error, and the checks after it still run, except when "loads"
fails: nothing else can run then, and the rest are NOT_RUN saying so. Checks beyond the requested
level are NOT_RUN too, so a report always lists all ten. The suite passes when no check of its
level fails.

1. **loads**: load on ``profile.device_kind`` (timed), run one golden batch; every output there,
   batch-first, and the engine on the profile's device.
2. **parity** with the nearest FP32 ancestor that runs here (ONNX or TorchScript, on the CPU):
   per output the max abs and rel error (recorded), and a statistic of the normalised error
   ``|a-b| / (atol + rtol*|b|)`` that must be <= 1 (defaults by precision in ``_numerics``:
   fp32 1e-4/1e-3 elementwise, fp16 1e-2/1e-2 p99, bf16 5e-2/5e-2 p99; ``tolerances`` override).
   INT8 is judged on the task instead: with labels, retention of the task's primary metric;
   without, top-1 agreement (classification) or mean row cosine (others), each >= min_retention.
   An FP32 engine without an FP32 ancestor is the reference itself (NOT_RUN); any other engine
   without one FAILs (nothing says its numbers are right).
3. **shapes**: batches {min, (min+opt)//2, opt, (opt+max)//2, max} and each dynamic non-batch dim
   at its sizes give batch-first outputs of the right batch; a batch outside the range and a
   wrong-rank input are refused with a PipelineError (``out_of_range_refused``).
4. **finite**: no NaN/Inf in the golden outputs, nor for inputs all at their low, all at their
   high and all zeros (ranges: ``_golden.edge_ranges``).
5. **determinism**: one golden batch run twice differs by at most ``determinism_atol`` (default
   0, bit-identical, on the CPU; 1e-5 on CUDA).
6. **api_success** (the source's basic criterion): ``api_requests`` (2,000) requests through
   the platform's serving runtime at ``api_concurrency``, cycling over every shape case of 3;
   success is a 200 whose every output matches the engine run directly on that request (the
   parity tolerance of its precision; INT8 by row cosine); the success rate >= 99.9%.
7. **performance**: windowed latency at ``serving_batch`` as the benchmark measures it; p99 <=
   budget, throughput >= target, peak memory <= max_memory_fraction of the device's.
8. **serving**: the platform's serving runtime (registered by the worker through
   ``serving_probe``) loads the engine, lists the declared inputs in its metadata and answers one
   request with every output, within 1e-5 of the engine run directly; NOT_RUN where no runtime is
   registered (``python -m pipelines``).
9. **qps** (the source's performance criterion): ``qps_concurrency`` clients send requests of
   ``qps_request_batch`` samples for ``qps_seconds`` through the runtime's dynamic batching;
   the requests per second after the first 10% of the run, divided by the profile's cards (one
   GPU; a CPU socket) >= ``min_qps_per_card`` (500), with p99 in budget, errors <=
   ``max_error_rate`` and peak memory <= max_memory_fraction of the device's.
10. **scenario** (the source's scenario criterion): a test-case dataset's cases (every ``must``
   case passes, and the pass rate >= scenario_min_pass_rate, by default the reference's scaled
   by min_retention), and/or the task metric of the engine on the golden set's targets >=
   scenario_threshold (<= for error metrics), by default the reference's value scaled by
   min_retention. See ``_scenario``.

The report's ``criteria`` list the three headline criteria first (basic: the API success rate,
performance: QPS per card, scenario: the test cases' pass rate), read from checks 6, 9 and 10.

Measured values that are not finite (an infinite error) are recorded as the strings "inf",
"-inf" or "nan", so the report stays valid JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pipelines.certification._golden as golden_io
from pipelines.certification import _checks as checks_
from pipelines.certification._load_checks import check_api_success, check_qps
from pipelines.certification._parity import check_parity
from pipelines.certification._scenario import check_scenario
from pipelines.certification._state import (
    CheckRecord,
    SuiteState,
    check_sha256,
    find_reference,
    not_run,
    run_check,
)
from pipelines.certification.profiles import RUNTIME_FOR_FORMAT, HardwareProfile
from pipelines.certification.report import (
    CHECKS,
    LEVEL_CHECKS,
    CheckId,
    CheckResult,
    CheckVerdict,
    Level,
    SuiteReport,
    criteria_of,
)
from pipelines.certification.settings import TEXT_ONLY_SETTINGS, CertifySettings
from pipelines.core import Artifact, PipelineContext, PipelineError, ProgressFn
from pipelines.engines import input_specs as engine_input_specs
from pipelines.llm.kinds import is_text_format

__all__ = ["CHECK_FUNCTIONS", "describe_file", "find_reference", "run_suite"]

CHECK_FUNCTIONS: dict[CheckId, Callable[[SuiteState, CheckRecord], str]] = {
    CheckId.LOADS: checks_.check_loads,
    CheckId.PARITY: check_parity,
    CheckId.SHAPES: checks_.check_shapes,
    CheckId.FINITE: checks_.check_finite,
    CheckId.DETERMINISM: checks_.check_determinism,
    CheckId.API_SUCCESS: check_api_success,
    CheckId.PERFORMANCE: checks_.check_performance,
    CheckId.SERVING: checks_.check_serving,
    CheckId.QPS: check_qps,
    CheckId.SCENARIO: check_scenario,
}


def describe_file(artifact: Artifact) -> dict[str, Any]:
    """sha256, size and identity of a model file, for the report.

    ``backend`` is the runtime that runs its format (the suite replaces it with the engine's
    own name, e.g. "onnxruntime-cuda", once loaded); ``compiled_with`` the compile backend that
    made it, if one did.
    """
    from pipelines.backends.tensorrt_build import sha256_file

    # An archive version (ONNX with external data) runs unpacked: the archive is what is stored.
    return {
        "key": artifact.key,
        "sha256": sha256_file(artifact.meta.get("stored_file") or artifact.path),
        "size_bytes": Path(artifact.path).stat().st_size,
        "format": artifact.format,
        "precision": artifact.precision,
        "backend": RUNTIME_FOR_FORMAT.get(artifact.format, artifact.format),
        "compiled_with": artifact.backend,
    }


def _lowest_level(check_id: CheckId) -> Level:
    return next(level for level in Level if check_id in LEVEL_CHECKS[level])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_suite(
    engine_artifact: Artifact,
    ctx: PipelineContext,
    settings: CertifySettings,
    profile: HardwareProfile,
    progress: ProgressFn,
) -> SuiteReport:
    """Run every check of ``settings.level`` on ``engine_artifact`` on ``profile``; a language
    model runs its family's suite (:mod:`.text_suite`) into the same report model.

    Raises PipelineError only when the suite cannot start: the file's sha256 differs from the
    one recorded when it was made, the golden dataset does not fit the model, or the scenario
    level's golden dataset has no target. Failed checks are verdicts in the report.
    """
    if is_text_format(engine_artifact.format):  # a language model: its own checks, same report
        from pipelines.certification.text_suite import run_text_suite

        return run_text_suite(engine_artifact, ctx, settings, profile, progress)
    started_at = _now()
    level = Level(settings.level)
    engine_info = describe_file(engine_artifact)
    check_sha256(engine_artifact, engine_info)
    progress(0.0, "preparing the golden set")
    specs = engine_input_specs(engine_artifact)
    if not golden_io.has_batch(specs):
        raise PipelineError(
            f"{engine_artifact.key} declares no batch-first inputs; the suite runs models whose "
            "every input has a batch dim first"
        )
    profiles = golden_io.tensorrt_profiles(engine_artifact)
    dim_sizes = golden_io.dynamic_dims(specs, settings.dynamic_dims, profiles)
    golden = golden_io.load_golden(ctx, settings, specs, golden_io.middle(dim_sizes))
    if level == Level.SCENARIO and golden.targets is None and not settings.test_cases_dataset_id:
        raise PipelineError(
            f"golden dataset {settings.golden_dataset_id} has no target (a label, target or y "
            "column, or the target set on the dataset): the scenario level judges the engine's "
            "outputs against it"
        )
    s = SuiteState(
        artifact=engine_artifact,
        ctx=ctx,
        settings=settings,
        profile=profile,
        specs=specs,
        golden=golden,
        dim_sizes=dim_sizes,
        thresholds=settings.model_dump(mode="json", exclude=set(TEXT_ONLY_SETTINGS)),
        reference=find_reference(ctx, engine_artifact),
    )
    checks: list[CheckResult] = []
    in_level = LEVEL_CHECKS[level]
    for index, check_id in enumerate(CHECKS):
        if check_id not in in_level:
            needs = _lowest_level(check_id).value
            summary = f"not part of the {level.value} level; it runs from the {needs} level"
            checks.append(not_run(check_id, summary, CHECKS))
            continue
        if checks and checks[0].verdict == CheckVerdict.FAIL:
            checks.append(not_run(check_id, "not run: the engine did not load and run", CHECKS))
            continue
        progress(index / len(CHECKS), CHECKS[check_id])
        s.progress = lambda f, m, i=index: progress((i + f) / len(CHECKS), m)
        checks.append(run_check(check_id, s, CHECK_FUNCTIONS, CHECKS))
    if s.engine is not None:
        engine_info["backend"] = s.engine.backend
        engine_info["device"] = s.engine.device
    failed = [c for c in checks if c.id in in_level and c.verdict == CheckVerdict.FAIL]
    progress(1.0, "certification " + ("failed" if failed else "passed"))
    reference_info = None
    if s.reference is not None:
        reference_info = describe_file(s.reference)
    return SuiteReport(
        level=level,
        verdict="failed" if failed else "passed",
        profile=profile.to_dict(),
        engine=engine_info,
        reference=reference_info,
        golden=golden.record,
        thresholds=s.thresholds,
        criteria=criteria_of(checks),
        checks=checks,
        started_at=started_at,
        finished_at=_now(),
    )
