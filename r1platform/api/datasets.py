"""Datasets: ``/api/v1/datasets``; the same name uploaded again is its next version."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from django.http import HttpRequest
from django.shortcuts import get_object_or_404
from ninja import Field, File, Form, Router, Schema, Status
from ninja.files import UploadedFile

from r1platform.api.auth import team_id
from r1platform.api.schemas import ErrorOut, Errors, page_limit
from r1platform.datasets import services as datasets
from r1platform.datasets.models import Dataset

router = Router(tags=["datasets"])


class DatasetOut(Schema):
    id: int
    team: str
    name: str
    version: int
    format: str
    sha256: str
    size_bytes: int
    rows: int
    # ``schema`` is a pydantic method name: the field is ``schema_``, read and written as
    # ``schema`` (every route here answers by alias).
    schema_: dict[str, Any] = Field(alias="schema")
    target: str
    splits: dict[str, float]
    created_at: datetime

    @staticmethod
    def resolve_team(dataset: Dataset) -> str:
        return dataset.team.slug


@router.post("/datasets", response={201: DatasetOut, **Errors}, by_alias=True)
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
    return Status(201, dataset)


@router.get("/datasets", response=list[DatasetOut], by_alias=True)
def list_datasets(request: HttpRequest, limit: int = 50, offset: int = 0):
    found = Dataset.objects.filter(team_id=team_id(request)).select_related("team")
    return found.order_by("name", "-version")[offset : offset + page_limit(limit)]


@router.get("/datasets/{dataset_id}", response={200: DatasetOut, 404: ErrorOut}, by_alias=True)
def get_dataset(request: HttpRequest, dataset_id: int):
    return get_object_or_404(
        Dataset.objects.select_related("team"), pk=dataset_id, team_id=team_id(request)
    )
