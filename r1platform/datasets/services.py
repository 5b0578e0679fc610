"""Dataset uploads and their hand-over to pipelines."""

from __future__ import annotations

from pathlib import Path

from django.db import IntegrityError, transaction
from django.db.models import Max

from pipelines.core import DatasetRef
from pipelines.datasets import inspect_dataset
from pipelines.formats import RejectedUpload, sanitize_filename
from r1platform.accounts.models import Team
from r1platform.core import storage
from r1platform.datasets.models import Dataset

SPLIT_KEYS = ("train", "validation", "test")


class DatasetRefused(Exception):
    """The upload cannot become a dataset; the message says why, and nothing was kept."""


def parse_splits(raw: dict | None) -> dict[str, float]:
    """Train/validation/test fractions (summing to 1) and a seed; refuses anything else."""
    splits = {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 0}
    if not raw:
        return splits
    unknown = set(raw) - {*SPLIT_KEYS, "seed"}
    if unknown:
        raise DatasetRefused(
            f"unknown split keys {sorted(unknown)}; use train, validation, test, seed"
        )
    try:
        for key in SPLIT_KEYS:
            if key in raw:
                splits[key] = float(raw[key])
        splits["seed"] = int(raw.get("seed", 0))
    except (TypeError, ValueError):
        raise DatasetRefused("split fractions must be numbers and seed an integer") from None
    if any(not 0 <= splits[k] <= 1 for k in SPLIT_KEYS):
        raise DatasetRefused("each split fraction must be between 0 and 1")
    if abs(sum(splits[k] for k in SPLIT_KEYS) - 1.0) > 1e-6:
        raise DatasetRefused("train + validation + test must add up to 1")
    return splits


def upload_dataset(
    *, team: Team, user: object, name: str, uploaded, target: str = "", splits: dict | None = None
) -> Dataset:
    """Inspect an uploaded dataset without running anything and store it as the next version."""
    temp_path = Path(uploaded.temporary_file_path())
    try:
        name = name.strip()
        if not name or len(name) > 100:
            raise DatasetRefused("the dataset needs a name of 1 to 100 characters")
        parsed_splits = parse_splits(splits)
        info = inspect_dataset(temp_path, uploaded.name)
        _check_target(info.schema, target)
    except RejectedUpload as exc:
        temp_path.unlink(missing_ok=True)
        raise DatasetRefused(str(exc)) from None
    except DatasetRefused:
        temp_path.unlink(missing_ok=True)
        raise
    relative = storage.store_upload(
        temp_path, kind="datasets", team_id=team.pk, suffix=f".{info.format}"
    )
    try:
        with transaction.atomic():
            latest = Dataset.objects.filter(team=team, name=name).aggregate(n=Max("version"))["n"]
            return Dataset.objects.create(
                team=team,
                name=name,
                version=(latest or 0) + 1,
                format=info.format,
                file=relative,
                original_name=sanitize_filename(uploaded.name),
                sha256=uploaded.sha256,
                size_bytes=uploaded.size,
                rows=info.rows,
                schema=info.schema,
                target=target,
                splits=parsed_splits,
                created_by=user,
            )
    except IntegrityError:
        storage.remove(relative)
        raise DatasetRefused(
            "another upload of this dataset landed at the same time; retry"
        ) from None
    except Exception:
        storage.remove(relative)
        raise


def _check_target(schema: dict, target: str) -> None:
    if not target:
        return
    if schema.get("test_cases"):
        raise DatasetRefused(
            f"target {target!r} given, but this is a test-case dataset: each case holds its "
            "expected output; leave the target blank"
        )
    if schema.get("text_kind"):
        raise DatasetRefused(
            f"target {target!r} given, but this is a text dataset ({schema['text_kind']}): "
            "its rows say what the model should produce; leave the target blank"
        )
    names = [c["name"] for c in schema.get("columns", schema.get("arrays", []))]
    if target not in names:
        raise DatasetRefused(f"target {target!r} is not in the dataset (it has {', '.join(names)})")


def dataset_ref(dataset: Dataset) -> DatasetRef:
    """What a pipeline stage needs to read the dataset on a worker."""
    return DatasetRef(
        id=str(dataset.pk),
        path=str(storage.media_path(dataset.file)),
        format=dataset.format,
        target=dataset.target or None,
        splits=dict(dataset.splits),
        schema=dict(dataset.schema),
    )


def dataset_ids_in(stages: list[dict]) -> list[int]:
    """Every dataset a pipeline's settings name (settings ending in ``dataset_id``)."""
    ids: list[int] = []
    for stage in stages:
        for key, value in (stage.get("settings") or {}).items():
            if key.endswith("dataset_id") and value is not None:
                ids.append(int(value))
    return ids
