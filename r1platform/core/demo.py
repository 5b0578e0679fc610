"""Seeds the demo team, user and model, so a new user's first page is not empty."""

from __future__ import annotations

import tempfile
from pathlib import Path

from django.contrib.auth import get_user_model
from django.db import transaction

from pipelines.demo import (
    DEMO_HIDDEN,
    DIGITS_INPUT,
    build_digits_classifier,
    write_digits_dataset,
    write_digits_test_cases,
)
from r1platform.accounts.models import Membership, Team
from r1platform.core.storage import spool_local_file
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import upload_dataset
from r1platform.jobs.services import launch_job
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import upload_model

DEMO_USER = "demo"
DEMO_PASSWORD = "r1-demo-password"
DEMO_TEAM = "demo"
DEMO_MODEL = "digits-mlp"
DEMO_DATASET = "digits"
DEMO_CASES = "digits-cases"
DEMO_POOL = "cpu"


def demo_pipeline(
    dataset_id: int, profile: str | None = None, cases_id: int | None = None
) -> list[dict]:
    """Fine-tune on digits, quantize to static INT8 (Q/DQ) calibrated on it, compile, measure.

    With a hardware ``profile``, the compiled engine is then certified on it, with the digits
    validation split as the golden set: at the scenario level on the demo's test cases
    (``cases_id``), else at the performance level.
    """
    level = {"level": "scenario", "test_cases_dataset_id": cases_id} if cases_id else {}
    certify = [
        {
            "name": "certify",
            "settings": {
                "profile": profile,
                "level": "performance",
                "golden_dataset_id": dataset_id,
                **level,
            },
        }
    ]
    return [
        {"name": "finetune", "settings": {"dataset_id": dataset_id, "epochs": 3}},
        {
            "name": "quantize",
            "settings": {"mode": "int8_static", "calibration_dataset_id": dataset_id},
        },
        {"name": "compile", "settings": {"backend": "onnxruntime"}},
        {"name": "evaluate", "settings": {"dataset_id": dataset_id}},
        {"name": "benchmark", "settings": {}},
    ] + (certify if profile else [])


def demo_profile() -> str | None:
    """The hardware profile the demo certifies on: a live worker's onnxruntime one, if any."""
    from r1platform.workers.services import live_profiles

    found = live_profiles().filter(backend="onnxruntime").order_by("-device_kind").first()
    return found.key if found else None


def seed_demo() -> ModelVersion:
    """Create (once) the demo team, user and digits model; returns the model's first version."""
    User = get_user_model()
    with transaction.atomic():
        team, _ = Team.objects.get_or_create(slug=DEMO_TEAM, defaults={"name": "Demo team"})
        user = User.objects.filter(username=DEMO_USER).first()
        if user is None:
            user = User.objects.create_user(DEMO_USER, password=DEMO_PASSWORD, is_staff=True)
            user.is_superuser = True
            user.save(update_fields=["is_superuser"])
        Membership.objects.get_or_create(team=team, user=user)
    dataset = Dataset.objects.filter(team=team, name=DEMO_DATASET).first()
    if dataset is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "digits.csv"
            write_digits_dataset(path, "csv")
            dataset = upload_dataset(
                team=team,
                user=user,
                name=DEMO_DATASET,
                uploaded=spool_local_file(path),
                target="label",
            )
    cases = _seed_demo_cases(team, user)
    existing = RegisteredModel.objects.filter(team=team, name=DEMO_MODEL).first()
    if existing is not None:
        return existing.versions.order_by("number").first()
    version = _upload_demo_model(team, user)
    profile = demo_profile()
    # The first page shows a real run: the worker takes this job as soon as it starts.
    launch_job(
        version=version,
        user=user,
        stages=demo_pipeline(dataset.pk, profile, cases.pk),
        idempotency_key="demo-pipeline",
    )
    if profile is not None:
        _seed_demo_schedule(team, user, version.model, profile)
    return version


def _seed_demo_cases(team: Team, user: object) -> Dataset:
    """The demo's industry test cases for the digits model (the scenario level's suite)."""
    found = Dataset.objects.filter(team=team, name=DEMO_CASES).first()
    if found is not None:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits-cases.jsonl"
        write_digits_test_cases(path)
        return upload_dataset(
            team=team, user=user, name=DEMO_CASES, uploaded=spool_local_file(path), target=""
        )


def _seed_demo_schedule(team: Team, user: object, model: RegisteredModel, profile: str) -> None:
    """A ``cpu`` pool on the worker's profile and a nightly retraining of the demo model there."""
    from r1platform.deployments.models import ServingPool
    from r1platform.schedules import pipeline_templates
    from r1platform.schedules import services as schedules
    from r1platform.workers.models import HardwareProfile

    pool, _ = ServingPool.objects.get_or_create(
        name=DEMO_POOL,
        defaults={
            "profile": HardwareProfile.objects.get(key=profile),
            "description": "the demo worker's onnxruntime",
        },
    )
    template = pipeline_templates.create_template(
        team=team,
        user=user,
        name="nightly retrain",
        description="fine-tune on the newest data, static INT8, compile (certify is added)",
        stages=[
            {"name": "finetune", "settings": {"epochs": 3}},
            {"name": "quantize", "settings": {"mode": "int8_static"}},
            {"name": "compile", "settings": {"backend": "onnxruntime"}},
        ],
    )
    schedules.create_schedule(
        team=team,
        user=user,
        name=f"{model.name} nightly",
        model=model,
        template=template,
        dataset_name=DEMO_DATASET,
        pool=pool,
        cron="0 3 * * *",
        margin=0.005,
    )


def _upload_demo_model(team: Team, user: object) -> ModelVersion:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_mlp.pt"
        build_digits_classifier(path, epochs=20, hidden=DEMO_HIDDEN)
        spooled = spool_local_file(path)
    shape = ",".join(str(d) for d in DIGITS_INPUT[0].shape)
    return upload_model(
        team=team,
        user=user,
        name=DEMO_MODEL,
        task="classification",
        uploaded=spooled,
        input_shape=shape,
    )
