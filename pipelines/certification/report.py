"""What a certification run produces: each check's verdict with measured values and thresholds.

These pydantic models are the contract between the certify stage (which fills them on a worker)
and the platform (which stores them, renders the HTML/PDF reports and wraps them into the
versioned certificate JSON described in ``docs/certification.md``). JSON-safe throughout.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The engine families a suite runs for (the report's ``family``).
from pipelines.engines.tensor import TENSOR
from pipelines.llm.kinds import TEXT_GENERATION

__all__ = [
    "CHECKS",
    "CHECK_TITLES",
    "LEVEL_CHECKS",
    "SUITE_VERSION",
    "TENSOR",
    "TEXT_CHECKS",
    "TEXT_CRITERIA",
    "TEXT_GENERATION",
    "TEXT_LEVEL_CHECKS",
    "TEXT_SUITE_VERSION",
    "CheckId",
    "CheckResult",
    "CheckVerdict",
    "Criterion",
    "Level",
    "Measurement",
    "SuiteReport",
    "checks_of",
    "criteria_of",
    "level_at_least",
    "level_checks_of",
]

# Bumped when a check, a default threshold or the meaning of a measurement changes: certificates
# record it, so a reader knows which rules a verdict was given under.
# 2.0.0: the source's three criteria (API success rate, QPS per card, test cases) were added.
SUITE_VERSION = "2.0.0"
# The text-generation family's suite, versioned on its own (its checks, defaults and measurements
# change apart from the tensor suite's): tokenizer, stops and context checks, the streaming load
# through the serving process, output tokens/s per card as its performance criterion.
TEXT_SUITE_VERSION = "text-1.0.0"


class Level(StrEnum):
    BASIC = "basic"  # checks 1-6: API success rate
    PERFORMANCE = "performance"  # basic + 7-9: QPS per card
    SCENARIO = "scenario"  # performance + 10: test cases


_LEVEL_ORDER = [Level.BASIC, Level.PERFORMANCE, Level.SCENARIO]


def level_at_least(level: str, required: str) -> bool:
    """Whether a certificate at ``level`` satisfies a requirement of ``required``."""
    return _LEVEL_ORDER.index(Level(level)) >= _LEVEL_ORDER.index(Level(required))


class CheckId(StrEnum):
    LOADS = "loads"
    PARITY = "parity"
    SHAPES = "shapes"
    FINITE = "finite"
    DETERMINISM = "determinism"
    API_SUCCESS = "api_success"
    PERFORMANCE = "performance"
    SERVING = "serving"
    QPS = "qps"
    SCENARIO = "scenario"
    # The text-generation family's own checks.
    TOKENIZER = "tokenizer"
    STOPS = "stops"
    CONTEXT = "context"


# Every check of a tensor model in report order, with its title.
CHECKS: dict[CheckId, str] = {
    CheckId.LOADS: "Loads and runs on the profile",
    CheckId.PARITY: "Numerical parity with the FP32 reference",
    CheckId.SHAPES: "Shape coverage",
    CheckId.FINITE: "No NaN or Inf",
    CheckId.DETERMINISM: "Determinism",
    CheckId.API_SUCCESS: "API success rate",
    CheckId.PERFORMANCE: "Performance budget",
    CheckId.SERVING: "Serving contract",
    CheckId.QPS: "QPS per card",
    CheckId.SCENARIO: "Scenario",
}

LEVEL_CHECKS: dict[Level, tuple[CheckId, ...]] = {
    Level.BASIC: (
        CheckId.LOADS, CheckId.PARITY, CheckId.SHAPES, CheckId.FINITE, CheckId.DETERMINISM,
        CheckId.API_SUCCESS,
    ),
    Level.PERFORMANCE: (
        CheckId.LOADS, CheckId.PARITY, CheckId.SHAPES, CheckId.FINITE, CheckId.DETERMINISM,
        CheckId.API_SUCCESS, CheckId.PERFORMANCE, CheckId.SERVING, CheckId.QPS,
    ),
    Level.SCENARIO: tuple(CHECKS),
}  # fmt: skip

# Every check of a language model (text-generation) in report order, with its title: the tensor
# checks' ids where the meaning carries over, three of its own (tokenizer, stops, context).
TEXT_CHECKS: dict[CheckId, str] = {
    CheckId.LOADS: "Loads and generates on the profile",
    CheckId.TOKENIZER: "Tokenizer round trip",
    CheckId.PARITY: "Parity with the full-precision ancestor (perplexity, greedy agreement)",
    CheckId.FINITE: "No NaN or Inf in the logits",
    CheckId.DETERMINISM: "Greedy determinism",
    CheckId.STOPS: "Stops at EOS and at stop strings",
    CheckId.CONTEXT: "Context length enforced",
    CheckId.API_SUCCESS: "API success rate (streaming)",
    CheckId.PERFORMANCE: "Single-stream latency budget",
    CheckId.SERVING: "Serving contract (OpenAI-compatible API)",
    CheckId.QPS: "Output tokens/s per card under streaming load",
    CheckId.SCENARIO: "Scenario (text test cases)",
}

_TEXT_BASIC = (
    CheckId.LOADS, CheckId.TOKENIZER, CheckId.PARITY, CheckId.FINITE, CheckId.DETERMINISM,
    CheckId.STOPS, CheckId.CONTEXT, CheckId.API_SUCCESS,
)  # fmt: skip
TEXT_LEVEL_CHECKS: dict[Level, tuple[CheckId, ...]] = {
    Level.BASIC: _TEXT_BASIC,
    Level.PERFORMANCE: (*_TEXT_BASIC, CheckId.PERFORMANCE, CheckId.SERVING, CheckId.QPS),
    Level.SCENARIO: tuple(TEXT_CHECKS),
}

# Any check's title, whichever family it belongs to (a text title where the two differ is only
# used for text reports, whose checks carry their own titles).
CHECK_TITLES: dict[CheckId, str] = {**TEXT_CHECKS, **CHECKS}


def checks_of(family: str) -> dict[CheckId, str]:
    """The checks of a family's suite, in report order, with their titles."""
    return TEXT_CHECKS if family == TEXT_GENERATION else CHECKS


def level_checks_of(family: str) -> dict[Level, tuple[CheckId, ...]]:
    """The checks each level runs, for a family."""
    return TEXT_LEVEL_CHECKS if family == TEXT_GENERATION else LEVEL_CHECKS


# The source's definition of each level, the report's first table: the level, its criterion,
# the check that measures it and the measurement that is its value.
CRITERIA: dict[Level, tuple[str, CheckId, str]] = {
    Level.BASIC: ("API call success rate", CheckId.API_SUCCESS, "success_rate"),
    Level.PERFORMANCE: ("QPS per card", CheckId.QPS, "qps_per_card"),
    Level.SCENARIO: ("Industry test cases", CheckId.SCENARIO, "pass_rate"),
}
# A language model's: streaming generation has no fixed cost per request, so its performance
# criterion is the output tokens/s per card under concurrent streaming load (with its TTFT p99
# and time-per-output-token budgets judged in the same check), not QPS.
TEXT_CRITERIA: dict[Level, tuple[str, CheckId, str]] = {
    Level.BASIC: ("API call success rate (streaming)", CheckId.API_SUCCESS, "success_rate"),
    Level.PERFORMANCE: (
        "Output tokens/s per card (TTFT p99 and TPOT in budget)",
        CheckId.QPS,
        "output_tokens_per_s_per_card",
    ),
    Level.SCENARIO: ("Industry test cases", CheckId.SCENARIO, "pass_rate"),
}


class CheckVerdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    # The check could not apply (e.g. the serving runtime does not exist yet, or the engine is
    # itself the FP32 reference); it does not fail the suite, and the report says why.
    NOT_RUN = "not_run"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Measurement(_Model):
    """One measured value against its threshold: ``value <comparison> threshold`` passes."""

    name: str = Field(description='What was measured, e.g. "output.max_abs_error" or "p99_ms".')
    value: float | int | bool | str | None = Field(description="The measured value.")
    threshold: float | int | bool | str | None = Field(
        None, description="The limit it is judged against (None: recorded, not judged)."
    )
    comparison: Literal["<=", ">=", "==", "<", ""] = Field(
        "", description="How value is compared with threshold; empty when not judged."
    )
    unit: str = Field("", description='e.g. "ms", "samples/s", "MiB", "" for a ratio.')
    passed: bool | None = Field(None, description="The comparison's outcome; None if not judged.")


class Criterion(_Model):
    """One of the source's three headline criteria, as measured (or why it was not)."""

    level: Level
    title: str = Field(description='e.g. "API call success rate".')
    check: CheckId = Field(description="The check that measures it.")
    verdict: CheckVerdict
    value: float | int | bool | str | None = None
    threshold: float | int | bool | str | None = None
    comparison: Literal["<=", ">=", "==", "<", ""] = ""
    unit: str = ""
    summary: str = Field("", description="The check's summary line (or why it did not run).")


class CheckResult(_Model):
    id: CheckId
    title: str
    verdict: CheckVerdict
    summary: str = Field(description="One line a reader understands without the measurements.")
    measurements: list[Measurement] = Field(default_factory=list)
    # Check-specific data for the report, e.g. parity's error histogram:
    # {"histograms": {output: {"edges": [...], "counts": [...]}}}.
    details: dict[str, Any] = Field(default_factory=dict)
    seconds: float = 0.0


class SuiteReport(_Model):
    """The whole run of the suite on one engine, on one profile, at one level."""

    suite_version: str = SUITE_VERSION
    family: str = Field(
        default=TENSOR,
        description='The engine family the suite ran for: "tensor" or "text-generation".',
    )
    level: Level
    verdict: Literal["passed", "failed"]
    profile: dict[str, Any] = Field(description="HardwareProfile.to_dict() of where it ran.")
    engine: dict[str, Any] = Field(
        description="The certified file: sha256, size_bytes, format, precision, backend."
    )
    reference: dict[str, Any] | None = Field(
        None, description="The FP32 ancestor parity was judged against (sha256, format, ...)."
    )
    golden: dict[str, Any] = Field(
        default_factory=dict,
        description='Where the golden inputs came from: {"source": "dataset"|"generated", ...}.',
    )
    thresholds: dict[str, Any] = Field(description="Every threshold in force (defaults filled).")
    criteria: list[Criterion] = Field(
        default_factory=list,
        description="The three levels' headline criteria, basic first (empty before 2.0.0).",
    )
    checks: list[CheckResult]
    started_at: str = Field(description="ISO 8601, UTC.")
    finished_at: str = Field(description="ISO 8601, UTC.")


def criteria_of(checks: list[CheckResult], family: str = TENSOR) -> list[Criterion]:
    """The headline criteria, read from the checks that measure them (a criterion above the
    certification's level, whose check is absent, is NOT_RUN saying so)."""
    by_id = {check.id: check for check in checks}
    found = []
    criteria = TEXT_CRITERIA if family == TEXT_GENERATION else CRITERIA
    for level, (title, check_id, name) in criteria.items():
        check = by_id.get(check_id)
        if check is None:
            summary = f"not part of this certification's level ({level.value} measures it)"
            found.append(Criterion(level=level, title=title, check=check_id,
                                   verdict=CheckVerdict.NOT_RUN, summary=summary))  # fmt: skip
            continue
        # Its own measurement, else (a scenario judged on the task metric alone) the first judged.
        measured = next((m for m in check.measurements if m.name == name), None) or next(
            (m for m in check.measurements if m.comparison), None
        )
        values = (
            {"value": measured.value, "threshold": measured.threshold,
             "comparison": measured.comparison, "unit": measured.unit}
            if measured else {}
        )  # fmt: skip
        found.append(Criterion(level=level, title=title, check=check_id, verdict=check.verdict,
                               summary=check.summary, **values))  # fmt: skip
    return found
