"""certify: run the compatibility-certification suite on the current artifact, on one profile.

The settings are the suite's thresholds; every one has a default, chosen by precision where it
matters (see ``pipelines.certification.suite``). The stage fails (PipelineError) only when the
suite cannot run at all (this worker does not offer the profile, the golden set does not fit the
model); a check that fails is a verdict, recorded in the report, and the stage still succeeds.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.certification.report import (
    LEVEL_CHECKS,
    CheckId,
    CheckVerdict,
    Level,
    SuiteReport,
)
from pipelines.core import (
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageResult,
    StageSettings,
    timed_result,
)
from pipelines.stages._common import coerce_settings, require_format

__all__ = ["Certify", "CertifySettings", "OutputTolerance", "suite_metrics"]

BatchSize = Annotated[int, Field(ge=1, le=4096)]
DimSize = Annotated[int, Field(ge=1, le=1_000_000)]


class OutputTolerance(BaseModel):
    """Tolerance of one output (None fields keep the precision's default)."""

    model_config = ConfigDict(extra="forbid")

    atol: float | None = Field(None, ge=0.0, description="Absolute tolerance.")
    rtol: float | None = Field(None, ge=0.0, description="Relative tolerance (of the reference).")
    statistic: Literal["elementwise", "mean", "p99"] | None = Field(
        None,
        description=(
            "Over the elements' normalised error |a-b| / (atol + rtol*|b|), which must be <= 1: "
            "elementwise (the worst element), mean, or p99 (the 99th percentile)."
        ),
    )


class CertifySettings(StageSettings):
    """Settings of certify: where, at what level, and every threshold."""

    profile: str = Field(
        ..., min_length=1, max_length=100, description="The hardware profile's key."
    )
    level: Level = Field(
        Level.BASIC,
        description="basic: checks 1-5; performance: + budget and serving; scenario: + scenario.",
    )
    golden_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "Dataset whose rows are the golden inputs (and, with a target, the labels or "
            "expected outputs INT8 retention and the scenario are judged on). Without one, "
            "seeded random inputs of the declared shapes are used."
        ),
    )
    golden_split: Literal["validation", "test", "train", "all"] = Field(
        "validation", description="Which rows of the golden dataset."
    )
    golden_rows: int = Field(256, ge=1, le=100_000, description="At most this many golden rows.")
    tolerances: dict[str, OutputTolerance] = Field(
        default_factory=dict,
        description='Per output name (or "*" for all) tolerances, over the precision defaults.',
    )
    min_retention: float = Field(
        0.99,
        gt=0.0,
        le=1.0,
        description="INT8 parity: the task metric kept against the reference, at least this.",
    )
    min_batch: BatchSize = Field(1, description="Lowest batch size of a dynamic-batch engine.")
    opt_batch: BatchSize | None = Field(
        None, description="The batch size it is tuned for (default: the engine's, else 8)."
    )
    max_batch: BatchSize = Field(32, description="Highest batch size of a dynamic-batch engine.")
    dynamic_dims: dict[str, list[DimSize]] = Field(
        default_factory=dict,
        description=(
            'Sizes to cover for named dims other than the batch, e.g. {"seq": [1, 64, 128]}.'
        ),
    )
    input_range: tuple[float, float] | None = Field(
        None,
        description=(
            "Declared value range of the inputs for the NaN/Inf edge test (default: the golden "
            "set's min and max)."
        ),
    )
    determinism_atol: float | None = Field(
        None,
        ge=0.0,
        description=(
            "Allowed difference between two runs of one input (default: 0, bit-identical, on "
            "CPU; 1e-5 for CUDA backends, which are not deterministic)."
        ),
    )
    serving_batch: BatchSize | None = Field(
        None, description="Batch size the budget is judged at (default: opt_batch)."
    )
    p99_budget_ms: float = Field(500.0, gt=0.0, description="p99 latency budget at serving_batch.")
    min_throughput: float = Field(
        1.0, ge=0.0, description="Throughput target at serving_batch, samples per second."
    )
    max_memory_fraction: float = Field(
        0.85, gt=0.0, le=1.0, description="Peak memory under this fraction of the device's."
    )
    scenario_metric: str | None = Field(
        None, description="Scenario metric (default: the task's primary metric)."
    )
    scenario_threshold: float | None = Field(
        None,
        description=(
            "Scenario passes when the metric reaches this (default: the reference's value "
            "scaled by min_retention)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> CertifySettings:
        if self.min_batch > self.max_batch:
            raise ValueError(f"min_batch {self.min_batch} is above max_batch {self.max_batch}")
        for name, value in (("opt_batch", self.opt_batch), ("serving_batch", self.serving_batch)):
            if value is not None and not self.min_batch <= value <= self.max_batch:
                raise ValueError(
                    f"{name} {value} is outside min_batch..max_batch "
                    f"({self.min_batch}..{self.max_batch})"
                )
        if self.level == Level.SCENARIO and self.golden_dataset_id is None:
            raise ValueError(
                "the scenario level needs golden_dataset_id: a dataset with the expected "
                "outputs (its target) to judge the scenario on"
            )
        if self.input_range is not None and self.input_range[0] > self.input_range[1]:
            raise ValueError("input_range must be [low, high] with low <= high")
        return self


class Certify:
    """Run the certification suite on the current artifact."""

    name: ClassVar[str] = "certify"
    description: ClassVar[str] = (
        "Certify the current model on a hardware profile: loads and runs, numerical parity with "
        "its FP32 ancestor, shape coverage, no NaN/Inf, determinism (basic); performance budget "
        "and serving contract (performance); a team's golden scenario (scenario)."
    )
    Settings: ClassVar[type[StageSettings]] = CertifySettings
    accepts: ClassVar[tuple[str, ...]] = (
        ModelFormat.ONNX.value,
        ModelFormat.TORCHSCRIPT.value,
        ModelFormat.AOTINDUCTOR.value,
        ModelFormat.TENSORRT.value,
    )
    produces: ClassVar[str | None] = None

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Certify the current artifact on the profile; the report goes in ``details``."""
        from pipelines.certification.profiles import compatibility_problem, detect_profiles
        from pipelines.certification.suite import run_suite

        started = time.perf_counter()
        s = coerce_settings(CertifySettings, settings)
        artifact = ctx.current_artifact
        require_format(artifact, self.name, self.accepts)
        offered = detect_profiles()
        profile = next((p for p in offered if p.key == s.profile), None)
        if profile is None:
            keys = ", ".join(p.key for p in offered) or "none"
            raise PipelineError(f"this worker does not offer profile {s.profile}; it offers {keys}")
        problem = compatibility_problem(profile, artifact.format, artifact.meta)
        if problem is not None:
            raise PipelineError(problem)
        report = run_suite(artifact, ctx, s, profile, progress)
        failed = [
            c.id.value
            for c in report.checks
            if c.id in LEVEL_CHECKS[report.level] and c.verdict == CheckVerdict.FAIL
        ]
        where = f"{report.level.value} on {profile.key}"
        message = f"failed: {', '.join(failed)} ({where})" if failed else f"passed {where}"
        return timed_result(
            stage_id,
            self.name,
            started,
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


def suite_metrics(report: SuiteReport) -> dict[str, float]:
    """``certify.*`` numbers of a report: passed (1/0), checks failed, the key measurements.

    The parity error is the worst ``max_abs_error`` over the outputs; values that are not
    finite numbers are left out (MLflow and JSON take none).
    """
    level_checks = LEVEL_CHECKS[report.level]
    failed = [c for c in report.checks if c.id in level_checks and c.verdict == CheckVerdict.FAIL]
    metrics = {
        "certify.passed": 1.0 if report.verdict == "passed" else 0.0,
        "certify.checks_failed": float(len(failed)),
    }
    for check in report.checks:
        wanted = _METRICS.get(check.id, {})
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
