from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from ninja import Field, Schema


class ErrorOut(Schema):
    detail: str


class TensorOut(Schema):
    name: str
    shape: list[int | str]
    dtype: str


class BenchmarkOut(Schema):
    batch_size: int
    backend: str
    device: str
    p50_ms: float
    p90_ms: float | None
    p95_ms: float
    p99_ms: float
    throughput: float
    iterations: int
    windows: int
    converged: bool
    peak_rss_mb: float | None
    model_rss_mb: float | None
    gpu_mem_mb: float | None
    job_id: int


class VersionOut(Schema):
    id: int
    model_id: int
    number: int
    format: str
    precision: str
    backend: str
    parent_id: int | None
    job_id: int | None
    sha256: str
    size_bytes: int
    inputs: list[TensorOut]
    outputs: list[TensorOut]
    metrics: dict[str, Any]
    mlflow_version: str
    created_at: datetime


class VersionDetailOut(VersionOut):
    benchmarks: list[BenchmarkOut]


class ModelOut(Schema):
    id: int
    team: str
    name: str
    task: str
    latest_version: int
    mlflow_name: str
    created_at: datetime


class ModelDetailOut(ModelOut):
    versions: list[VersionOut]


class DatasetOut(Schema):
    id: int
    team: str
    name: str
    version: int
    format: str
    sha256: str
    size_bytes: int
    rows: int
    schema_: dict[str, Any] = Field(alias="schema")
    target: str
    splits: dict[str, float]
    created_at: datetime


class StageIn(Schema):
    name: str
    settings: dict[str, Any] = {}


class JobIn(Schema):
    version_id: int
    stages: list[StageIn] | None = None
    idempotency_key: str | None = None


class StageResultOut(Schema):
    stage_id: str
    name: str
    status: str
    seconds: float
    message: str
    versions: list[int]


class JobOut(Schema):
    id: int
    status: str
    progress: float
    current_stage: str
    version_id: int
    stages: list[StageIn]
    stage_results: list[StageResultOut]
    error: str
    log_tail: str
    queue: str
    attempts: int
    worker_host: str
    idempotency_key: str
    mlflow_run_id: str
    mlflow_run_url: str | None
    produced_version_ids: list[int]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class StageSchemaOut(Schema):
    name: str
    description: str
    accepts: list[str]
    produces: str | None
    settings_schema: dict[str, Any]


class ProfileOut(Schema):
    key: str
    label: str
    backend: str
    backend_version: str
    device_kind: str
    device_name: str
    compute_capability: str
    isa: list[str]
    driver_version: str
    cuda_version: str
    total_memory_mb: float
    first_seen: datetime
    last_seen: datetime
    served: bool = Field(description="A live worker offers this profile now.")


class CertificationIn(Schema):
    version_id: int
    profile: str = Field(description="The hardware profile's key (GET /profiles).")
    level: str = Field("basic", description="basic, performance or scenario.")
    thresholds: dict[str, Any] | None = Field(
        None, description="Over the defaults; the certify stage's settings schema lists them."
    )
    golden_dataset_id: int | None = None
    idempotency_key: str | None = None


class MeasurementOut(Schema):
    name: str
    value: float | int | bool | str | None
    threshold: float | int | bool | str | None
    comparison: str
    unit: str
    passed: bool | None


class CheckOut(Schema):
    id: str
    title: str
    verdict: str = Field(description="pass, fail or not_run.")
    summary: str
    measurements: list[MeasurementOut]
    details: dict[str, Any]
    seconds: float


class ValidityOut(Schema):
    valid: bool
    state: str = Field(description="valid, invalid, failed, pending or error.")
    reasons: list[str]


class CertificationOut(Schema):
    id: int
    status: str = Field(description="pending, passed, failed or error.")
    verdict: str | None
    level: str
    version_id: int
    model_id: int
    profile: str
    profile_label: str
    job_id: int | None
    golden_dataset_id: int | None
    settings: dict[str, Any]
    thresholds: dict[str, Any]
    engine_sha256: str
    suite_version: str
    checks: list[CheckOut]
    validity: ValidityOut
    error: str
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None
    reports: dict[str, str] = Field(description="kind (html, pdf, json) -> URL, once rendered.")


class CertifiedOut(Schema):
    certified: bool
    certification_id: int | None
    reason: str
    level: str
    profile: str


# -- promotion -------------------------------------------------------------------------------------


class PoolOut(Schema):
    name: str
    description: str
    profile: str = Field(description="The hardware profile's key: what this pool serves on.")
    profile_label: str
    backend: str
    max_queue_delay_ms: float
    max_batch_size: int


class PromoteIn(Schema):
    version_id: int
    pool: str = Field(description="The serving pool's name (GET /pools).")
    stage: Literal["staging", "production"]
    reason: str = ""


class RollbackIn(Schema):
    pool: str
    stage: Literal["staging", "production"] = "production"
    reason: str = ""


class DecisionIn(Schema):
    reason: str = ""


class VersionRefOut(Schema):
    id: int
    number: int
    format: str
    precision: str
    backend: str


class DeploymentCertOut(Schema):
    id: int
    level: str
    valid: bool
    state: str = Field(description="valid, invalid, failed, pending or error.")
    reasons: list[str]


class DeploymentOut(Schema):
    pool: str
    profile: str
    stage: str
    version: VersionRefOut
    previous_version: VersionRefOut | None
    certification: DeploymentCertOut | None = Field(
        description="The certificate the version was promoted on, and whether it holds now."
    )
    generation: int = Field(description="Bumped on every change; the serving runtime polls it.")
    updated_at: datetime
    updated_by: str | None


class PromotionRequestOut(Schema):
    id: int
    model_id: int
    pool: str
    stage: str
    version: VersionRefOut
    status: str = Field(description="pending, approved, rejected, refused or superseded.")
    reason: str
    requested_by: str | None
    requested_label: str
    decided_by: str | None
    decision_reason: str
    created_at: datetime
    decided_at: datetime | None


class PromotionOut(Schema):
    status: str = Field(description="promoted, rolled_back or pending.")
    reason: str
    deployment: DeploymentOut | None
    request: PromotionRequestOut | None


class AuditEventOut(Schema):
    id: int
    action: str = Field(
        description="promoted, rolled_back, refused, requested, approved or rejected."
    )
    pool: str | None
    stage: str
    version: VersionRefOut | None
    previous_version: VersionRefOut | None
    actor: str | None
    actor_label: str
    reason: str
    created_at: datetime


class WorkerOut(Schema):
    hostname: str
    state: Literal["live", "lost", "stopped"] = Field(
        description="lost: no beat for R1_WORKER_LOST_SECONDS and it did not say it stopped."
    )
    queues: list[str]
    profiles: list[str] = Field(description="The keys of the hardware profiles it offers.")
    started_at: datetime
    last_seen: datetime
    current_job_ids: list[int] = Field(
        description="The running jobs it holds that belong to the token's team."
    )
