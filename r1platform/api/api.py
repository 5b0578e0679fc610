"""The JSON API (``/api/v1/``), its OpenAPI document at ``/api/v1/openapi.json``.

Every endpoint needs a team token (``Authorization: Bearer <token>``) and sees only that team's
objects; another team's id answers 404, as if it did not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

from django.db.models import Q
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from ninja import File, Form, NinjaAPI, Status
from ninja.files import UploadedFile

from pipelines.stages import stage_schemas
from r1platform.accounts.scoping import get_scoped_or_404
from r1platform.api import schemas as s
from r1platform.api.auth import TeamToken, team_id
from r1platform.api.notifications import router as notifications_router
from r1platform.api.schedules import router as schedules_router
from r1platform.certification import services as certification
from r1platform.certification.models import Certification
from r1platform.certification.reports import stored_report
from r1platform.core import tracking
from r1platform.datasets import services as datasets
from r1platform.datasets.models import Dataset
from r1platform.deployments import services as deployments
from r1platform.deployments.models import (
    AuditEvent,
    Deployment,
    PromotionRequest,
    ServingPool,
)
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry import services as registry
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.workers.models import HardwareProfile, Worker
from r1platform.workers.services import live_profiles, worker_state

api = NinjaAPI(
    title="r1platform API",
    version="1",
    description=(
        "Upload models, launch pipelines, read versions, jobs and benchmarks; certify versions "
        "on hardware profiles and read their certificates; promote certified versions to "
        "serving pools, roll them back, approve promotions and read the audit log."
    ),
    auth=TeamToken(),
    urls_namespace="api",
)
api.add_router("", schedules_router)
api.add_router("", notifications_router)

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


# -- certification ---------------------------------------------------------------------------------


def _profile_out(p: HardwareProfile, served: set[int]) -> dict:
    fields = ("key", "backend", "backend_version", "device_kind", "device_name", "isa")
    more = ("compute_capability", "driver_version", "cuda_version", "total_memory_mb")
    return {
        **{f: getattr(p, f) for f in fields + more},
        "label": p.label,
        "first_seen": p.first_seen,
        "last_seen": p.last_seen,
        "served": p.pk in served,
    }


def _certification_out(cert: Certification) -> dict:
    report = cert.report or {}
    checked = certification.validity(cert)
    reports = {
        kind: reverse(f"api:certification_report_{kind}", args=[cert.pk])
        for kind in certification.REPORT_KINDS
        if getattr(cert, f"report_{kind}")
    }
    return {
        **{f: getattr(cert, f) for f in ("id", "status", "level", "version_id", "job_id")},
        **{f: getattr(cert, f) for f in ("golden_dataset_id", "settings", "engine_sha256")},
        **{f: getattr(cert, f) for f in ("suite_version", "error", "created_at", "finished_at")},
        "verdict": report.get("verdict"),
        "model_id": cert.version.model_id,
        "profile": cert.profile.key,
        "profile_label": cert.profile.label,
        "thresholds": report.get("thresholds", {}),
        "checks": report.get("checks", []),
        "validity": {"valid": checked.valid, "state": checked.state, "reasons": checked.reasons},
        "created_by": cert.created_by.get_username() if cert.created_by else None,
        "reports": reports,
    }


def _get_certification(request: HttpRequest, certification_id: int) -> Certification:
    qs = Certification.objects.select_related("version__model", "profile", "created_by")
    return get_scoped_or_404(qs, [team_id(request)], pk=certification_id)


@api.get("/profiles", response=list[s.ProfileOut], tags=["certification"])
def list_profiles(request: HttpRequest, served: bool | None = None):
    """Every hardware profile a worker has reported, and whether a live worker serves it now."""
    live = set(live_profiles().values_list("pk", flat=True))
    found = [p for p in HardwareProfile.objects.all() if served is None or (p.pk in live) == served]
    return [_profile_out(p, live) for p in found]


@api.post(
    "/certifications",
    response={200: s.CertificationOut, 201: s.CertificationOut, **Errors},
    tags=["certification"],
)
def create_certification(request: HttpRequest, payload: s.CertificationIn):
    """Queue the certification suite on a version for one profile; refused with 400 up front.

    The same idempotency_key again returns the first certification (200).
    """
    team = team_id(request)
    version = get_scoped_or_404(ModelVersion.objects.all(), [team], pk=payload.version_id)
    key = (payload.idempotency_key or "").strip()
    repeated = bool(key) and Job.objects.filter(team_id=team, idempotency_key=key).exists()
    try:
        cert = certification.launch_certification(
            version=version,
            profile_key=payload.profile,
            level=payload.level,
            user=request.user,
            thresholds=payload.thresholds,
            golden_dataset_id=payload.golden_dataset_id,
            idempotency_key=key or None,
        )
    except jobs.IdempotencyConflict as exc:
        return Status(409, {"detail": str(exc)})
    except jobs.LaunchRefused as exc:
        return Status(400, {"detail": str(exc)})
    return Status(200 if repeated else 201, _certification_out(cert))


@api.get("/certifications", response=list[s.CertificationOut], tags=["certification"])
def list_certifications(
    request: HttpRequest,
    version_id: int | None = None,
    profile: str = "",
    status: str = "",
    limit: int = 50,
    offset: int = 0,
):
    limit = max(1, min(limit, 500))
    found = Certification.objects.filter(team_id=team_id(request)).select_related(
        "version__model", "profile", "created_by"
    )
    if version_id is not None:
        found = found.filter(version_id=version_id)
    if profile:
        found = found.filter(profile__key=profile)
    if status:
        found = found.filter(status=status)
    page = found.order_by("-created_at", "-pk")[offset : offset + limit]
    return [_certification_out(c) for c in page]


@api.get(
    "/certifications/{certification_id}",
    response={200: s.CertificationOut, 404: s.ErrorOut},
    tags=["certification"],
)
def get_certification(request: HttpRequest, certification_id: int):
    """Status, verdict, each check with its measurements, and whether the certificate holds now."""
    return _certification_out(_get_certification(request, certification_id))


def _report(request: HttpRequest, certification_id: int, kind: str):
    report = stored_report(_get_certification(request, certification_id), kind)
    if report is None:
        return Status(404, {"detail": f"certification {certification_id} has no {kind} report yet"})
    response = HttpResponse(report.data, content_type=report.content_type)
    response["Content-Disposition"] = f'attachment; filename="{report.filename}"'
    return response


@api.get(
    "/certifications/{certification_id}/report.html",
    response={404: s.ErrorOut},
    tags=["certification"],
    url_name="certification_report_html",
)
def certification_report_html(request: HttpRequest, certification_id: int):
    """The standalone HTML report (404 until the suite has finished)."""
    return _report(request, certification_id, "html")


@api.get(
    "/certifications/{certification_id}/report.pdf",
    response={404: s.ErrorOut},
    tags=["certification"],
    url_name="certification_report_pdf",
)
def certification_report_pdf(request: HttpRequest, certification_id: int):
    """The PDF report (404 until the suite has finished)."""
    return _report(request, certification_id, "pdf")


@api.get(
    "/certifications/{certification_id}/report.json",
    response={404: s.ErrorOut},
    tags=["certification"],
    url_name="certification_report_json",
)
def certification_report_json(request: HttpRequest, certification_id: int):
    """The certificate document (schema: docs/certificate.schema.json); 404 until finished."""
    return _report(request, certification_id, "json")


@api.get(
    "/versions/{version_id}/certified",
    response={200: s.CertifiedOut, 404: s.ErrorOut},
    tags=["certification"],
)
def version_certified(request: HttpRequest, version_id: int, profile: str, level: str = "basic"):
    """Whether the version holds a valid certificate at ``level`` (or above) for ``profile``."""
    version = get_scoped_or_404(ModelVersion.objects.all(), [team_id(request)], pk=version_id)
    answer = certification.is_certified(version, level, profile)
    return {
        "certified": answer.certified,
        "certification_id": answer.certification.pk if answer.certification else None,
        "reason": answer.reason,
        "level": level,
        "profile": profile,
    }


# -- promotion -------------------------------------------------------------------------------------


def _version_ref(v: ModelVersion | None) -> dict | None:
    if v is None:
        return None
    return {f: getattr(v, f) for f in ("id", "number", "format", "precision", "backend")}


def _username(user) -> str | None:
    return user.get_username() if user else None


def _deployment_out(d: Deployment) -> dict:
    cert = None
    if d.certification is not None:
        checked = certification.validity(d.certification)
        cert = {
            "id": d.certification.pk,
            "level": d.certification.level,
            "valid": checked.valid,
            "state": checked.state,
            "reasons": checked.reasons,
        }
    return {
        "pool": d.pool.name,
        "profile": d.pool.profile.key,
        "stage": d.stage,
        "version": _version_ref(d.version),
        "previous_version": _version_ref(d.previous_version),
        "certification": cert,
        "generation": d.generation,
        "updated_at": d.updated_at,
        "updated_by": _username(d.updated_by),
    }


def _request_out(r: PromotionRequest) -> dict:
    return {
        **{f: getattr(r, f) for f in ("id", "model_id", "stage", "status", "reason")},
        **{f: getattr(r, f) for f in ("requested_label", "decision_reason")},
        **{f: getattr(r, f) for f in ("created_at", "decided_at")},
        "pool": r.pool.name,
        "version": _version_ref(r.version),
        "requested_by": _username(r.requested_by),
        "decided_by": _username(r.decided_by),
    }


def _promotion_out(outcome: deployments.PromotionOutcome) -> dict:
    deployment = outcome.deployment
    if deployment is not None:
        deployment = _deployments().get(pk=deployment.pk)
    return {
        "status": outcome.status,
        "reason": outcome.reason,
        "deployment": _deployment_out(deployment) if deployment else None,
        "request": _request_out(outcome.request) if outcome.request else None,
    }


def _refusal(outcome: deployments.PromotionOutcome):
    return Status(403 if outcome.forbidden else 409, {"detail": outcome.reason})


def _deployments():
    return Deployment.objects.select_related(
        "pool__profile", "version", "previous_version", "certification__profile",
        "certification__version", "updated_by",
    )  # fmt: skip


def _actor_label(request: HttpRequest) -> str:
    token = request.auth  # type: ignore[attr-defined]
    return f"token {token.name or token.prefix}"


def _get_model(request: HttpRequest, model_id: int) -> RegisteredModel:
    return get_scoped_or_404(
        RegisteredModel.objects.select_related("team"), [team_id(request)], pk=model_id
    )


def _get_pool(name: str) -> ServingPool | None:
    return ServingPool.objects.select_related("profile").filter(name=name).first()


def _no_pool(name: str):
    known = ", ".join(ServingPool.objects.values_list("name", flat=True)) or "none"
    return Status(400, {"detail": f"no serving pool named {name!r}; pools: {known}"})


@api.get("/pools", response=list[s.PoolOut], tags=["promotion"])
def list_pools(request: HttpRequest):
    """Every serving pool and the hardware profile it serves on."""
    return [
        {
            **{f: getattr(p, f) for f in ("name", "description", "max_queue_delay_ms")},
            "max_batch_size": p.max_batch_size,
            "profile": p.profile.key,
            "profile_label": p.profile.label,
            "backend": p.profile.backend,
        }
        for p in ServingPool.objects.select_related("profile")
    ]


@api.post(
    "/models/{model_id}/promote",
    response={201: s.PromotionOut, 202: s.PromotionOut, **Errors},
    tags=["promotion"],
)
def promote(request: HttpRequest, model_id: int, payload: s.PromoteIn):
    """Serve a certified version in a pool at a stage: 201 when done, 202 when it waits for
    another member's approval, 409 with the reason when the gate refuses (the refusal is audited).
    """
    model = _get_model(request, model_id)
    version = get_scoped_or_404(
        ModelVersion.objects.all(), [team_id(request)], pk=payload.version_id
    )
    pool = _get_pool(payload.pool)
    if pool is None:
        return _no_pool(payload.pool)
    outcome = deployments.promote(
        model=model,
        version=version,
        pool=pool,
        stage=payload.stage,
        actor=request.user,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    if outcome.refused:
        return _refusal(outcome)
    return Status(202 if outcome.status == "pending" else 201, _promotion_out(outcome))


@api.post(
    "/models/{model_id}/rollback", response={200: s.PromotionOut, **Errors}, tags=["promotion"]
)
def rollback(request: HttpRequest, model_id: int, payload: s.RollbackIn):
    """Serve the slot's previous version again (through the gate); 409 when there is none or its
    certificate no longer holds."""
    model = _get_model(request, model_id)
    pool = _get_pool(payload.pool)
    if pool is None:
        return _no_pool(payload.pool)
    outcome = deployments.rollback(
        model=model,
        pool=pool,
        stage=payload.stage,
        actor=request.user,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    if outcome.refused:
        return _refusal(outcome)
    return _promotion_out(outcome)


@api.get(
    "/models/{model_id}/deployments",
    response={200: list[s.DeploymentOut], 404: s.ErrorOut},
    tags=["promotion"],
)
def list_deployments(request: HttpRequest, model_id: int):
    """What each pool serves for the model at each stage, and whether its certificate holds now."""
    model = _get_model(request, model_id)
    return [_deployment_out(d) for d in _deployments().filter(model=model)]


@api.get(
    "/models/{model_id}/promotions",
    response={200: list[s.PromotionRequestOut], 404: s.ErrorOut},
    tags=["promotion"],
)
def list_promotion_requests(
    request: HttpRequest, model_id: int, status: str = "", limit: int = 50, offset: int = 0
):
    """The model's promotion requests, newest first (``status=pending`` for those waiting)."""
    limit = max(1, min(limit, 500))
    model = _get_model(request, model_id)
    found = model.promotion_requests.select_related("pool", "version", "requested_by", "decided_by")
    if status:
        found = found.filter(status=status)
    return [_request_out(r) for r in found.order_by("-created_at", "-pk")[offset : offset + limit]]


def _get_request(request: HttpRequest, request_id: int) -> PromotionRequest:
    qs = PromotionRequest.objects.select_related("model__team", "pool", "version", "requested_by")
    return get_scoped_or_404(qs, [team_id(request)], pk=request_id)


@api.post(
    "/promotions/{request_id}/approve",
    response={200: s.PromotionOut, 403: s.ErrorOut, **Errors},
    tags=["promotion"],
)
def approve_promotion(request: HttpRequest, request_id: int, payload: s.DecisionIn):
    """Approve another member's request: the gate is asked again and the version served (200);
    403 for one's own request, 409 when it is no longer pending or the gate refuses."""
    outcome = deployments.approve(_get_request(request, request_id), request.user, payload.reason)
    if outcome.refused:
        return _refusal(outcome)
    return _promotion_out(outcome)


@api.post(
    "/promotions/{request_id}/reject",
    response={200: s.PromotionRequestOut, 403: s.ErrorOut, **Errors},
    tags=["promotion"],
)
def reject_promotion(request: HttpRequest, request_id: int, payload: s.DecisionIn):
    """Turn down another member's request (403 for one's own, 409 when no longer pending)."""
    outcome = deployments.reject(_get_request(request, request_id), request.user, payload.reason)
    if outcome.refused:
        return _refusal(outcome)
    return _request_out(_get_request(request, request_id))


@api.get(
    "/models/{model_id}/audit",
    response={200: list[s.AuditEventOut], 404: s.ErrorOut},
    tags=["promotion"],
)
def list_audit_events(
    request: HttpRequest, model_id: int, action: str = "", limit: int = 100, offset: int = 0
):
    """Every promotion, rollback, refusal, request and decision on the model, newest first."""
    limit = max(1, min(limit, 500))
    model = _get_model(request, model_id)
    found = AuditEvent.objects.filter(model=model).select_related(
        "pool", "version", "previous_version", "actor"
    )
    if action:
        found = found.filter(action=action)
    return [
        {
            **{f: getattr(e, f) for f in ("id", "action", "stage", "actor_label", "reason")},
            "created_at": e.created_at,
            "pool": e.pool.name if e.pool else None,
            "version": _version_ref(e.version),
            "previous_version": _version_ref(e.previous_version),
            "actor": _username(e.actor),
        }
        for e in found[offset : offset + limit]
    ]


__all__ = ["api", "JobStatus"]


# -- workers ---------------------------------------------------------------------------------------


@api.get("/workers", response=list[s.WorkerOut], tags=["workers"])
def list_workers(request: HttpRequest):
    """Every worker that reported itself, its state, and the team's jobs it runs now."""
    workers = list(Worker.objects.prefetch_related("profiles"))
    running = Job.objects.filter(
        team_id=team_id(request),
        status=JobStatus.RUNNING,
        worker_host__in=[w.hostname for w in workers],
    ).order_by("pk")
    by_host: dict[str, list[int]] = {}
    for host, pk in running.values_list("worker_host", "pk"):
        by_host.setdefault(host, []).append(pk)
    return [
        {
            "hostname": w.hostname,
            "state": worker_state(w),
            "queues": w.queues,
            "profiles": [p.key for p in w.profiles.all()],
            "started_at": w.started_at,
            "last_seen": w.last_seen,
            "current_job_ids": by_host.get(w.hostname, []),
        }
        for w in workers
    ]
