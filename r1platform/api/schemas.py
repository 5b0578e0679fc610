from __future__ import annotations

from datetime import datetime
from typing import Any

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
