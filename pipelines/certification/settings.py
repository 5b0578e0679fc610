"""The certify stage's settings: where, at what level, and every threshold of the suite.

They live beside the suite (not in the stage) because the suite's modules read them: the stage
imports the suite, so settings kept in the stage made the two import each other.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.certification.report import Level
from pipelines.core import StageSettings

__all__ = [
    "TENSOR_ONLY_SETTINGS",
    "TEXT_GOLDEN_KINDS",
    "TEXT_ONLY_SETTINGS",
    "CertifySettings",
    "OutputTolerance",
]

# The text dataset kinds a language model's golden set may be: they hold text to score (its
# perplexity) and to prompt with; test cases do not.
TEXT_GOLDEN_KINDS = ("text", "prompt_completion", "messages")

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
        description=(
            "basic: loads, parity, shapes, finite, determinism and the API success rate; "
            "performance: + latency budget, serving contract and QPS per card; scenario: + "
            "test cases."
        ),
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
    api_requests: int = Field(
        2000,
        ge=1000,
        le=1_000_000,
        description=(
            "API success rate: requests sent through the serving runtime (at least 1,000, so "
            "that 99.9% means something), mixing every batch size and dynamic dim covered."
        ),
    )
    api_concurrency: int = Field(8, ge=1, le=256, description="API success rate: requests at once.")
    min_success_rate: float = Field(
        0.999,
        ge=0.999,
        le=1.0,
        description=(
            "API success rate to pass: a 200 whose outputs match the engine run directly (the "
            "parity rule). The source's 99.9%; a team may raise it, not lower it."
        ),
    )
    qps_seconds: float = Field(
        30.0, ge=1.0, le=600.0, description="QPS per card: how long the sustained load runs."
    )
    qps_concurrency: int = Field(
        32, ge=1, le=1024, description="QPS per card: clients sending requests at once."
    )
    qps_request_batch: BatchSize = Field(
        1, description="QPS per card: samples in each request (the runtime batches requests)."
    )
    min_qps_per_card: float = Field(
        500.0,
        ge=0.0,
        description=(
            "QPS per card to pass (the source's 500): requests per second through the serving "
            "runtime divided by the profile's cards (GPUs; CPU sockets on a CPU profile)."
        ),
    )
    max_error_rate: float = Field(
        0.001, ge=0.0, le=1.0, description="QPS per card: failed requests under this fraction."
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
    test_cases_dataset_id: int | None = Field(
        None,
        ge=1,
        description=(
            "Scenario: a test-case dataset (named cases, each with inputs, an expected output "
            "and a check: equals, argmax, within, top_k, cosine; tags such as must)."
        ),
    )
    scenario_min_pass_rate: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Scenario: the test cases' pass rate to reach (default: the reference's pass rate "
            "scaled by min_retention); every case tagged must passes whatever this is."
        ),
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

    # -- language models (text-generation) only -------------------------------------------------
    text_prompts: int = Field(
        8,
        ge=1,
        le=256,
        description=(
            "Language models: golden prompts (the first text_prompt_tokens tokens of the golden "
            "texts) for the logits, determinism, greedy-agreement, stop and serving checks."
        ),
    )
    text_prompt_tokens: int = Field(
        16, ge=1, le=4096, description="Language models: tokens of each golden prompt."
    )
    text_new_tokens: int = Field(
        64,
        ge=1,
        le=4096,
        description=(
            "Language models: greedy tokens generated per golden prompt (greedy agreement is "
            "judged on these) and per test case."
        ),
    )
    min_tokenizer_roundtrip: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description=(
            "Language models: share of the golden texts (and a few non-ASCII probes) that "
            "decode(encode(text)) gives back unchanged."
        ),
    )
    max_ppl_increase: float = Field(
        0.02,
        ge=0.0,
        description=(
            "Language models, parity: perplexity on the golden texts at most this much above "
            "the full-precision ancestor's (0.02: +2%)."
        ),
    )
    min_greedy_agreement: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "Language models, parity and serving: share of the first text_new_tokens greedy "
            "tokens equal to the full-precision ancestor's (and of the served text equal to the "
            "engine's). After the first different token the continuations part, so 0.5 means "
            "the first half agrees on average."
        ),
    )
    stream_requests: int = Field(
        500,
        ge=10,
        le=1_000_000,
        description=(
            "Language models: streaming completions sent through the serving process for the "
            "API success rate, decode failures, TTFT, TPOT and output tokens/s (with fewer than "
            "1,000, 99.9% means none may fail)."
        ),
    )
    stream_concurrency: int = Field(
        8, ge=1, le=256, description="Language models: streaming clients at once."
    )
    stream_max_tokens: int = Field(
        32, ge=1, le=4096, description="Language models: max_tokens of each streaming request."
    )
    max_decode_failure_rate: float = Field(
        0.001,
        gt=0.0,
        le=1.0,
        description=(
            "Language models: decode failures (a stream that ended in error or without [DONE], "
            "invalid UTF-8, no finish_reason) under this fraction of the streams."
        ),
    )
    ttft_p99_budget_ms: float = Field(
        2000.0,
        gt=0.0,
        description="Language models: time to first token, p99, under streaming load (and alone).",
    )
    tpot_budget_ms: float = Field(
        250.0,
        gt=0.0,
        description=(
            "Language models: time per output token after the first, p99 of the requests' "
            "means, under streaming load (and alone)."
        ),
    )
    min_output_tokens_per_card: float = Field(
        20.0,
        ge=0.0,
        description=(
            "Language models' performance criterion (instead of QPS): output tokens per second "
            "through the serving process under streaming load, divided by the profile's cards."
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
        if (
            self.level == Level.SCENARIO
            and self.golden_dataset_id is None
            and self.test_cases_dataset_id is None
        ):
            raise ValueError(
                "the scenario level needs test_cases_dataset_id (a test-case dataset) or "
                "golden_dataset_id (a dataset with the expected outputs, its target) to judge "
                "the scenario on"
            )
        if self.input_range is not None and self.input_range[0] > self.input_range[1]:
            raise ValueError("input_range must be [low, high] with low <= high")
        return self


# Settings only one family's suite reads: a report records the thresholds its family uses.
TEXT_ONLY_SETTINGS = frozenset(
    {
        "text_prompts",
        "text_prompt_tokens",
        "text_new_tokens",
        "min_tokenizer_roundtrip",
        "max_ppl_increase",
        "min_greedy_agreement",
        "stream_requests",
        "stream_concurrency",
        "stream_max_tokens",
        "max_decode_failure_rate",
        "ttft_p99_budget_ms",
        "tpot_budget_ms",
        "min_output_tokens_per_card",
    }
)
TENSOR_ONLY_SETTINGS = frozenset(
    {
        "tolerances",
        "min_batch",
        "opt_batch",
        "max_batch",
        "dynamic_dims",
        "input_range",
        "determinism_atol",
        "api_requests",
        "api_concurrency",
        "qps_seconds",
        "qps_concurrency",
        "qps_request_batch",
        "min_qps_per_card",
        "serving_batch",
        "p99_budget_ms",
        "min_throughput",
        "scenario_metric",
        "scenario_threshold",
    }
)
