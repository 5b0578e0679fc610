"""Jobs and the stages they run: ``/api/v1/jobs`` and ``/api/v1/stages``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from ninja import Router, Schema, Status

from pipelines.stages import stage_schemas
from r1platform.api.auth import team_id
from r1platform.api.errors import Unsent, unsent
from r1platform.api.schemas import ErrorOut, Errors, StageIn, page_limit
from r1platform.core import tracking
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job
from r1platform.registry.models import ModelVersion

router = Router(tags=["jobs"])


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

    @staticmethod
    def resolve_mlflow_run_url(job: Job) -> str | None:
        if not job.mlflow_run_id:
            return None
        proxy = settings.R1_PUBLIC_URL + reverse("mlflow:job_run", args=[job.pk])
        return tracking.run_url(job.mlflow_experiment_id, job.mlflow_run_id, proxy)

    @staticmethod
    def resolve_produced_version_ids(job: Job) -> list[int]:
        return sorted(job.produced.values_list("pk", flat=True))


# One entry of ``pipelines.stages.stage_schemas()``, its ``settings`` renamed. (No docstring:
# pydantic would put it in the OpenAPI document.)
class StageSchemaOut(Schema):
    name: str
    family: str
    description: str
    accepts: list[str]
    produces: str | None
    settings_schema: dict[str, Any]

    @staticmethod
    def resolve_settings_schema(stage: dict[str, Any]) -> dict[str, Any]:
        return stage["settings"]


@router.post("/jobs", response={200: JobOut, 201: JobOut, **Errors, **Unsent})
def create_job(request: HttpRequest, payload: JobIn, response: HttpResponse):
    """Queue a pipeline on a version; the same idempotency_key twice returns the first job.

    503 (with Retry-After) when the job is stored but the broker cannot take it now: it is sent
    once the broker is back, and the same idempotency_key again answers with it then.
    """
    version = get_object_or_404(ModelVersion, pk=payload.version_id, team_id=team_id(request))
    stages = None if payload.stages is None else [st.dict() for st in payload.stages]
    try:
        job, created = jobs.launch_job(
            version=version,
            user=request.user,
            stages=stages,
            idempotency_key=payload.idempotency_key,
        )
    except jobs.IdempotencyConflict as exc:
        return Status(409, {"detail": str(exc)})
    except jobs.LaunchRefused as exc:
        return Status(400, {"detail": str(exc)})
    if jobs.waits_for_broker(job):
        return unsent(job, response)
    return Status((201 if created else 200), job)


@router.get("/jobs", response=list[JobOut])
def list_jobs(request: HttpRequest, status: str = "", limit: int = 50, offset: int = 0):
    found = Job.objects.filter(team_id=team_id(request))
    if status:
        found = found.filter(status=status)
    return found.order_by("-created_at")[offset : offset + page_limit(limit)]


@router.get("/jobs/{job_id}", response={200: JobOut, 404: ErrorOut})
def get_job(request: HttpRequest, job_id: int):
    return get_object_or_404(Job, pk=job_id, team_id=team_id(request))


@router.post("/jobs/{job_id}/cancel", response={200: JobOut, 404: ErrorOut, 409: ErrorOut})
def cancel_job(request: HttpRequest, job_id: int):
    job = get_object_or_404(Job, pk=job_id, team_id=team_id(request))
    if job.is_finished:
        return Status(409, {"detail": f"job {job.pk} has already ended ({job.status})"})
    return jobs.cancel_job(job)


@router.get("/stages", response=list[StageSchemaOut])
def list_stages(request: HttpRequest):
    """Every stage a job can run, with the JSON schema of its settings."""
    return stage_schemas()
