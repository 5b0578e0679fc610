"""The certify stage's settings: where, at what level, and every threshold of the suite.

They live beside the suite (not in the stage) because the suite's modules read them: the stage
imports the suite, so settings kept in the stage made the two import each other.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.certification.report import Level
from pipelines.core import StageSettings

__all__ = ["CertifySettings", "OutputTolerance"]

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
