"""Models and their versions: ``/api/v1/models`` and ``/api/v1/versions/{id}``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import File, Form, Router, Schema, Status
from ninja.files import UploadedFile

from r1platform.api.auth import team_id
from r1platform.api.schemas import ErrorOut, Errors, page_limit
from r1platform.registry import services as registry
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel

router = Router(tags=["models"])


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
    shapes: dict[str, list[int]]  # each input's shape as timed
    spread: float | None  # (max - min) / min of the pooled windows' p50
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

    @staticmethod
    def resolve_benchmarks(version: ModelVersion) -> QuerySet[BenchmarkResult]:
        return version.benchmarks.order_by("batch_size", "backend")


class ModelOut(Schema):
    id: int
    team: str
    name: str
    task: str
    latest_version: int
    mlflow_name: str
    created_at: datetime

    @staticmethod
    def resolve_team(model: RegisteredModel) -> str:
        return model.team.slug


class ModelDetailOut(ModelOut):
    versions: list[VersionOut]

    @staticmethod
    def resolve_versions(model: RegisteredModel) -> QuerySet[ModelVersion]:
        return model.versions.order_by("number")


@router.post("/models", response={201: ModelDetailOut, **Errors})
def create_model(
    request: HttpRequest,
    name: Form[str],
    task: Form[str] = "other",
    input_shape: Form[str] = "",
    input_dtype: Form[str] = "float32",
    file: File[UploadedFile] = None,  # type: ignore[assignment]
):
    """Upload a model (ONNX, TorchScript, a Hugging Face checkpoint folder as a zip or tar, or a
    GGUF file) as version 1 of a new model; a language model's task is text-generation (set so
    when left at "other")."""
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
    return Status(201, version.model)


@router.get("/models", response=list[ModelOut])
def list_models(request: HttpRequest, q: str = "", limit: int = 50, offset: int = 0):
    models = RegisteredModel.objects.filter(team_id=team_id(request)).select_related("team")
    if q:
        models = models.filter(Q(name__icontains=q))
    return models.order_by("-updated_at")[offset : offset + page_limit(limit)]


@router.get("/models/{model_id}", response={200: ModelDetailOut, 404: ErrorOut})
def get_model(request: HttpRequest, model_id: int):
    return get_object_or_404(
        RegisteredModel.objects.select_related("team"), pk=model_id, team_id=team_id(request)
    )


@router.get("/versions/{version_id}", response={200: VersionDetailOut, 404: ErrorOut})
def get_version(request: HttpRequest, version_id: int):
    return get_object_or_404(ModelVersion, pk=version_id, team_id=team_id(request))
