"""The certificate as a JSON document: its versioned schema, as pydantic models.

``docs/certificate.schema.json`` is :func:`json_schema` written out (a test keeps the two equal);
regenerate it with ``python -m r1platform.certification.document > docs/certificate.schema.json``
after changing a model here, and bump :data:`SCHEMA_ID` when a change would break a reader.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.certification.report import CheckResult, Criterion, Level

SCHEMA_ID = "r1platform.certificate/1"

__all__ = [
    "SCHEMA_ID",
    "CertificateDocument",
    "DatasetRef",
    "LineageEntry",
    "ModelRef",
    "ProfileRef",
    "ValidityRef",
    "VersionRef",
    "json_schema",
]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Doc):
    id: int
    name: str
    task: str
    team: str = Field(description="The team's slug.")


class VersionRef(_Doc):
    """The certified version: the file the certificate binds."""

    id: int
    number: int
    format: str
    precision: str
    backend: str
    sha256: str = Field(description="The version's sha256 as registered.")
    size_bytes: int
    mlflow_version: str = Field(description='Its MLflow model version ("" if not mirrored).')


class ProfileRef(_Doc):
    """The hardware profile, as it was when the suite ran."""

    key: str
    label: str
    backend: str
    backend_version: str
    device_kind: str
    device_name: str
    compute_capability: str = ""
    isa: list[str] = Field(default_factory=list)
    driver_version: str = ""
    cuda_version: str = ""
    total_memory_mb: float = 0.0


class DatasetRef(_Doc):
    id: int
    name: str
    version: int
    sha256: str
    target: str


class LineageEntry(_Doc):
    """One version on the way from the upload to the certified engine."""

    version_id: int
    number: int
    format: str
    precision: str
    backend: str
    sha256: str
    job_id: int | None = Field(description="The job that made it; None for the upload.")
    created_at: datetime


class ValidityRef(_Doc):
    state: Literal["valid", "invalid", "failed", "pending", "error"]
    valid: bool
    reasons: list[str] = Field(description="Why it is not valid; empty when it is.")
    checked_at: datetime


class CertificateDocument(_Doc):
    """One certification: what was certified, where, under which rules, and the verdict."""

    schema_id: Literal["r1platform.certificate/1"] = Field(
        SCHEMA_ID, description="This document's schema and its version."
    )
    certificate_id: int
    status: Literal["pending", "passed", "failed", "error"]
    verdict: Literal["passed", "failed"] | None = Field(
        description="The suite's verdict; None while pending or when the job ended without one."
    )
    level: Level
    model: ModelRef
    version: VersionRef
    engine_sha256: str = Field(description="sha256 of the file the suite ran ('' until it ran).")
    profile: ProfileRef
    suite_version: str
    thresholds: dict[str, Any] = Field(description="Every threshold in force, defaults filled.")
    criteria: list[Criterion] = Field(
        default_factory=list,
        description=(
            "The source's three criteria first: basic (API call success rate), performance "
            "(QPS per card), scenario (industry test cases), each measured value against its "
            "threshold; empty for suites before 2.0.0."
        ),
    )
    checks: list[CheckResult]
    golden: dict[str, Any] = Field(description="Where the golden inputs came from.")
    golden_dataset: DatasetRef | None
    test_cases_dataset: DatasetRef | None = Field(
        None, description="The test-case dataset the scenario level judged, or null."
    )
    reference: dict[str, Any] | None = Field(
        description="The FP32 ancestor parity was judged against."
    )
    lineage: list[LineageEntry] = Field(description="The upload first, the certified version last.")
    job_id: int | None
    launched_by: str | None = Field(description="Username of who launched it.")
    launched_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str = Field(description="Why the job ended without a report (status error).")
    validity: ValidityRef = Field(description="Validity when this document was generated.")
    generated_at: datetime


def json_schema() -> dict[str, Any]:
    return CertificateDocument.model_json_schema()


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
