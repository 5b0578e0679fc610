"""certify: run the compatibility-certification suite on the current artifact, on one profile.

The settings are the suite's thresholds; every one has a default, chosen by precision where it
matters (see ``pipelines.certification.suite``). The stage fails (PipelineError) only when the
suite cannot run at all (this worker does not offer the profile, the golden set does not fit the
model); a check that fails is a verdict, recorded in the report, and the stage still succeeds.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pipelines.certification.report import (
    TEXT_GENERATION,
    CheckId,
    CheckVerdict,
    SuiteReport,
    level_checks_of,
)
from pipelines.certification.settings import CertifySettings
from pipelines.core import (
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
)
from pipelines.stages.base import Stage, StageOutcome

__all__ = ["Certify", "suite_metrics"]


class Certify(Stage[CertifySettings]):
    """Run the certification suite on the current artifact."""

    name: ClassVar[str] = "certify"
    description: ClassVar[str] = (
        "Certify the current model on a hardware profile: loads and runs, numerical parity with "
        "its FP32 ancestor, shape coverage, no NaN/Inf, determinism (basic); performance budget "
        "and serving contract (performance); a team's golden scenario (scenario). A language "
        "model: loads, tokenizer round trip, perplexity and greedy parity, finite logits, greedy "
        "determinism, stops, context length and the streaming API success rate (basic); "
        "latency, serving contract and output tokens/s per card (performance); text test cases "
        "(scenario)."
    )
    Settings: ClassVar[type[StageSettings]] = CertifySettings
    accepts: ClassVar[tuple[str, ...]] = (
        ModelFormat.ONNX.value,
        ModelFormat.TORCHSCRIPT.value,
        ModelFormat.AOTINDUCTOR.value,
        ModelFormat.TENSORRT.value,
        # Language models: the text-generation family's checks (pipelines.certification.text_suite).
        ModelFormat.HF_CHECKPOINT.value,
        ModelFormat.ORT_GENAI.value,
        ModelFormat.LORA_ADAPTER.value,
    )
    produces: ClassVar[str | None] = None

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: CertifySettings, progress: ProgressFn
    ) -> StageOutcome:
        """Certify the current artifact on the profile; the report goes in ``details``."""
        from pipelines.certification.profiles import compatibility_problem, detect_profiles
        from pipelines.certification.suite import run_suite

        artifact = ctx.current_artifact
        offered = detect_profiles()
        profile = next((p for p in offered if p.key == s.profile), None)
        if profile is None:
            keys = ", ".join(p.key for p in offered) or "none"
            raise PipelineError(f"this worker does not offer profile {s.profile}; it offers {keys}")
        problem = compatibility_problem(profile, artifact.format, artifact.meta)
        if problem is not None:
            raise PipelineError(problem)
        report = run_suite(artifact, ctx, s, profile, progress)
        level_checks = level_checks_of(report.family)[report.level]
        failed = [
            c.id.value
            for c in report.checks
            if c.id in level_checks and c.verdict == CheckVerdict.FAIL
        ]
        where = f"{report.level.value} on {profile.key}"
        message = f"failed: {', '.join(failed)} ({where})" if failed else f"passed {where}"
        return StageOutcome(
            metrics=suite_metrics(report),
            message=message,
            details=report.model_dump(mode="json"),
        )


# Measurements copied into the stage's metrics (and so MLflow): check -> measurement -> metric.
_METRICS: dict[CheckId, dict[str, str]] = {
    CheckId.LOADS: {"load_seconds": "load_seconds"},
    CheckId.PARITY: {"retention": "parity.retention", "top1_agreement": "parity.top1_agreement"},
    CheckId.DETERMINISM: {"max_abs_difference": "determinism.max_abs_difference"},
    CheckId.PERFORMANCE: {
        "p99_ms": "p99_ms",
        "p50_ms": "p50_ms",
        "throughput": "throughput",
        "peak_memory_mb": "peak_memory_mb",
    },
}
# A language model's (its parity, latency and streaming load measure other things).
_TEXT_METRICS: dict[CheckId, dict[str, str]] = {
    CheckId.LOADS: {"load_seconds": "load_seconds"},
    CheckId.PARITY: {
        "perplexity": "parity.perplexity",
        "ppl_increase": "parity.ppl_increase",
        "greedy_agreement": "parity.greedy_agreement",
    },
    CheckId.PERFORMANCE: {
        "ttft_p99_ms": "ttft_p99_ms",
        "tpot_p99_ms": "tpot_p99_ms",
        "peak_memory_mb": "peak_memory_mb",
    },
    CheckId.API_SUCCESS: {
        "success_rate": "api.success_rate",
        "decode_failure_rate": "api.decode_failure_rate",
    },
    CheckId.QPS: {
        "output_tokens_per_s_per_card": "output_tokens_per_s_per_card",
        "ttft_p99_ms": "streaming.ttft_p99_ms",
        "tpot_p99_ms": "streaming.tpot_p99_ms",
    },
}


def suite_metrics(report: SuiteReport) -> dict[str, float]:
    """``certify.*`` numbers of a report: passed (1/0), checks failed, the key measurements.

    The parity error is the worst ``max_abs_error`` over the outputs; values that are not
    finite numbers are left out (MLflow and JSON take none).
    """
    level_checks = level_checks_of(report.family)[report.level]
    failed = [c for c in report.checks if c.id in level_checks and c.verdict == CheckVerdict.FAIL]
    metrics = {
        "certify.passed": 1.0 if report.verdict == "passed" else 0.0,
        "certify.checks_failed": float(len(failed)),
    }
    table = _TEXT_METRICS if report.family == TEXT_GENERATION else _METRICS
    for check in report.checks:
        wanted = table.get(check.id, {})
        for m in check.measurements:
            value = m.value
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            if m.name in wanted:
                metrics[f"certify.{wanted[m.name]}"] = float(value)
            elif check.id == CheckId.PARITY and m.name.endswith(".max_abs_error"):
                key = "certify.parity.max_abs_error"
                metrics[key] = max(metrics.get(key, 0.0), float(value))
            elif check.id == CheckId.SCENARIO and m.passed is not None:
                metrics[f"certify.scenario.{m.name}"] = float(value)
    return metrics
