"""The JSON API (``/api/v1/``), its OpenAPI document at ``/api/v1/openapi.json``.

Every endpoint needs a team token (``Authorization: Bearer <token>``) and sees only that team's
objects; another team's id answers 404, as if it did not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from django.db.models import Q
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import File, Form, NinjaAPI, Status
from ninja.files import UploadedFile

from pipelines.stages import stage_schemas
from r1platform.api import schemas as s
from r1platform.api.auth import TeamToken, team_id
from r1platform.core import tracking
from r1platform.datasets import services as datasets
from r1platform.datasets.models import Dataset
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry import services as registry
from r1platform.registry.models import ModelVersion, RegisteredModel

api = NinjaAPI(
    title="r1platform API",
    version="1",
    description="Upload models, launch pipelines, read versions, jobs and benchmarks.",
    auth=TeamToken(),
    urls_namespace="api",
)

Errors = {400: s.ErrorOut, 404: s.ErrorOut, 409: s.ErrorOut, 413: s.ErrorOut}


def _version_out(v: ModelVersion) -> dict:
    return {
        "id": v.pk,
        "model_id": v.model_id,
        "number": v.number,
        "format": v.format,
        "precision": v.precision,
        "backend": v.backend,
        "parent_id": v.parent_id,
        "job_id": v.job_id,
        "sha256": v.sha256,
        "size_bytes": v.size_bytes,
        "inputs": v.inputs,
        "outputs": v.outputs,
        "metrics": v.metrics,
        "mlflow_version": v.mlflow_version,
        "created_at": v.created_at,
    }


def _model_out(m: RegisteredModel) -> dict:
    return {
        "id": m.pk,
        "team": m.team.slug,
        "name": m.name,
        "task": m.task,
        "latest_version": m.latest_version,
        "mlflow_name": m.mlflow_name,
        "created_at": m.created_at,
    }


def _job_out(job: Job) -> dict:
    run_url = None
    if job.mlflow_run_id:
        run_url = tracking.run_url(job.mlflow_experiment_id, job.mlflow_run_id)
    return {
        **{f: getattr(job, f) for f in ("id", "status", "progress", "current_stage", "version_id")},
        **{f: getattr(job, f) for f in ("stages", "stage_results", "error", "log_tail", "queue")},
        **{f: getattr(job, f) for f in ("attempts", "worker_host", "idempotency_key")},
        **{f: getattr(job, f) for f in ("created_at", "started_at", "finished_at")},
        "mlflow_run_id": job.mlflow_run_id,
        "mlflow_run_url": run_url,
        "produced_version_ids": sorted(job.produced.values_list("pk", flat=True)),
    }


@api.post("/models", response={201: s.ModelDetailOut, **Errors}, tags=["models"])
def create_model(
    request: HttpRequest,
    name: Form[str],
    task: Form[str] = "other",
    input_shape: Form[str] = "",
    input_dtype: Form[str] = "float32",
    file: File[UploadedFile] = None,  # type: ignore[assignment]
):
    """Upload a model file (ONNX or TorchScript) as version 1 of a new model."""
    refusal = getattr(request, "upload_refusal", None)
    if refusal:
        return Status(413, {"detail": refusal})
    if file is None:
        return Status(400, {"detail": "no file was uploaded (multipart field 'file')"})
    try:
        version = registry.upload_model(
            team=request.auth.team,  # type: ignore[attr-defined]
            user=request.user,
            name=name,
            task=task,
            uploaded=file,
            input_shape=input_shape,
            input_dtype=input_dtype,
        )
    except registry.UploadRefused as exc:
        return Status(400, {"detail": str(exc)})
    return Status(201, {**_model_out(version.model), "versions": [_version_out(version)]})


@api.get("/models", response=list[s.ModelOut], tags=["models"])
def list_models(request: HttpRequest, q: str = "", limit: int = 50, offset: int = 0):
    limit = max(1, min(limit, 500))
    models = RegisteredModel.objects.filter(team_id=team_id(request)).select_related("team")
    if q:
        models = models.filter(Q(name__icontains=q))
    return [_model_out(m) for m in models.order_by("-updated_at")[offset : offset + limit]]


@api.get("/models/{model_id}", response={200: s.ModelDetailOut, 404: s.ErrorOut}, tags=["models"])
def get_model(request: HttpRequest, model_id: int):
    model = get_object_or_404(
        RegisteredModel.objects.select_related("team"), pk=model_id, team_id=team_id(request)
    )
    versions = model.versions.order_by("number")
    return {**_model_out(model), "versions": [_version_out(v) for v in versions]}


@api.get(
    "/versions/{version_id}", response={200: s.VersionDetailOut, 404: s.ErrorOut}, tags=["models"]
)
def get_version(request: HttpRequest, version_id: int):
    version = get_object_or_404(ModelVersion, pk=version_id, team_id=team_id(request))
    rows = version.benchmarks.order_by("batch_size", "backend")
    benchmarks = [{f: getattr(b, f) for f in s.BenchmarkOut.model_fields} for b in rows]
    return {**_version_out(version), "benchmarks": benchmarks}


def _dataset_out(d: Dataset) -> dict:
    fields = ("id", "name", "version", "format", "sha256", "size_bytes", "rows", "target")
    return {
        **{f: getattr(d, f) for f in fields},
        "team": d.team.slug,
        "schema": d.schema,
        "splits": d.splits,
        "created_at": d.created_at,
    }


@api.post("/datasets", response={201: s.DatasetOut, **Errors}, tags=["datasets"], by_alias=True)
def create_dataset(
    request: HttpRequest,
    name: Form[str],
    target: Form[str] = "",
    splits: Form[str] = "",
    file: File[UploadedFile] = None,  # type: ignore[assignment]
):
    """Upload a CSV, JSON Lines or .npz dataset; the same name again makes its next version.

    ``splits`` is optional JSON such as {"train": 0.7, "validation": 0.15, "test": 0.15, "seed": 1}.
    """
    refusal = getattr(request, "upload_refusal", None)
    if refusal:
        return Status(413, {"detail": refusal})
    if file is None:
        return Status(400, {"detail": "no file was uploaded (multipart field 'file')"})
    try:
        parsed = json.loads(splits) if splits.strip() else None
        if parsed is not None and not isinstance(parsed, dict):
            raise ValueError
    except ValueError:
        Path(file.temporary_file_path()).unlink(missing_ok=True)
        return Status(400, {"detail": 'splits must be a JSON object, e.g. {"train": 0.8, ...}'})
    try:
        dataset = datasets.upload_dataset(
            team=request.auth.team,  # type: ignore[attr-defined]
            user=request.user,
            name=name,
            uploaded=file,
            target=target,
            splits=parsed,
        )
    except datasets.DatasetRefused as exc:
        return Status(400, {"detail": str(exc)})
    return Status(201, _dataset_out(dataset))


@api.get("/datasets", response=list[s.DatasetOut], tags=["datasets"], by_alias=True)
def list_datasets(request: HttpRequest, limit: int = 50, offset: int = 0):
    limit = max(1, min(limit, 500))
    found = Dataset.objects.filter(team_id=team_id(request)).select_related("team")
    return [_dataset_out(d) for d in found.order_by("name", "-version")[offset : offset + limit]]


@api.get(
    "/datasets/{dataset_id}",
    response={200: s.DatasetOut, 404: s.ErrorOut},
    tags=["datasets"],
    by_alias=True,
)
def get_dataset(request: HttpRequest, dataset_id: int):
    dataset = get_object_or_404(
        Dataset.objects.select_related("team"), pk=dataset_id, team_id=team_id(request)
    )
    return _dataset_out(dataset)


@api.post("/jobs", response={200: s.JobOut, 201: s.JobOut, **Errors}, tags=["jobs"])
def create_job(request: HttpRequest, payload: s.JobIn):
    """Queue a pipeline on a version; the same idempotency_key twice returns the first job."""
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
    return Status((201 if created else 200), _job_out(job))


@api.get("/jobs", response=list[s.JobOut], tags=["jobs"])
def list_jobs(request: HttpRequest, status: str = "", limit: int = 50, offset: int = 0):
    limit = max(1, min(limit, 500))
    found = Job.objects.filter(team_id=team_id(request))
    if status:
        found = found.filter(status=status)
    return [_job_out(j) for j in found.order_by("-created_at")[offset : offset + limit]]


@api.get("/jobs/{job_id}", response={200: s.JobOut, 404: s.ErrorOut}, tags=["jobs"])
def get_job(request: HttpRequest, job_id: int):
    return _job_out(get_object_or_404(Job, pk=job_id, team_id=team_id(request)))


@api.post(
    "/jobs/{job_id}/cancel",
    response={200: s.JobOut, 404: s.ErrorOut, 409: s.ErrorOut},
    tags=["jobs"],
)
def cancel_job(request: HttpRequest, job_id: int):
    job = get_object_or_404(Job, pk=job_id, team_id=team_id(request))
    if job.is_finished:
        return Status(409, {"detail": f"job {job.pk} has already ended ({job.status})"})
    return _job_out(jobs.cancel_job(job))


@api.get("/stages", response=list[s.StageSchemaOut], tags=["jobs"])
def list_stages(request: HttpRequest):
    """Every stage a job can run, with the JSON schema of its settings."""
    return [
        {
            "name": st["name"],
            "description": st["description"],
            "accepts": list(st["accepts"]),
            "produces": st["produces"],
            "settings_schema": st["settings"],
        }
        for st in stage_schemas()
    ]


__all__ = ["api", "JobStatus"]
