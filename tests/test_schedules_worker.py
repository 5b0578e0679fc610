"""Scheduled retraining end to end on a real worker: fine-tune, certify, decide, promote."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from r1platform.deployments.models import Deployment, ServingPool
from r1platform.jobs.models import JobStatus
from r1platform.schedules import pipeline_templates, runs, services
from r1platform.schedules.models import Decision, ScheduleRun
from r1platform.workers.models import HardwareProfile
from tests.conftest import wait_for_job
from tests.test_certification_worker import _onnxruntime_profile, _wait_reported
from tests.test_worker import upload

pytestmark = pytest.mark.worker


def _upload_digits(api, tmp_path) -> int:
    from pipelines.demo import write_digits_dataset

    data = tmp_path / "digits.csv"
    write_digits_dataset(data, "csv")
    with open(data, "rb") as f:
        response = api.post("/api/v1/datasets", {"name": "digits", "file": f, "target": "label"})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _decided(run: ScheduleRun, timeout: float = 240.0) -> ScheduleRun:
    job = wait_for_job(run.job_id, timeout=timeout)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run.refresh_from_db()
        if run.decision != Decision.RUNNING:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run.pk} was not decided: {run.reason}")


def test_a_schedule_retrains_certifies_and_promotes(
    worker, api, team, user, digits_torchscript, tmp_path
):
    key = _onnxruntime_profile()
    _wait_reported(key)
    # A name of its own: MLflow's registry lives for the whole test run (tests/test_worker.py
    # counts the versions registered under "digits").
    v1 = upload(api, digits_torchscript, "digits-retrain", "batch,64")
    _upload_digits(api, tmp_path)
    pool = ServingPool.objects.create(name="cpu-e2e", profile=HardwareProfile.objects.get(key=key))
    template = pipeline_templates.create_template(
        team=team, user=user, name="retrain",
        stages=[{"name": "finetune", "settings": {"epochs": 1}}],
    )  # fmt: skip
    schedule = services.create_schedule(
        team=team, user=user, name="nightly", model=v1_model(v1), template=template,
        dataset_name="digits", pool=pool, cron="0 3 * * *", margin=0.0,
    )  # fmt: skip

    # First run: no champion yet, so the certified fine-tuned model is promoted.
    first = _decided(runs.run_schedule(schedule.pk, trigger="beat"))
    assert first.decision == Decision.PROMOTED, first.reason
    assert first.reason == "no production version yet"
    assert first.job.queue == f"profile.{key}" and first.challenger.format == "onnx"
    served = Deployment.objects.get(pool=pool, stage="production")
    assert served.version == first.challenger

    # The same data again: skipped, saying so.
    ScheduleRun.objects.update(created_at=timezone.now() - timedelta(hours=1))
    skipped = runs.run_schedule(schedule.pk, trigger="beat")
    assert skipped.decision == Decision.SKIPPED
    assert skipped.reason == f"the data has not changed since run {first.pk} (digits v1)"

    # New data: the run trains on from the champion's TorchScript parent and is scored.
    _upload_digits(api, tmp_path)
    ScheduleRun.objects.update(created_at=timezone.now() - timedelta(hours=1))
    second = runs.run_schedule(schedule.pk, trigger="beat")
    assert str(second.dataset) == "digits v2"
    assert second.job.version == first.challenger.parent  # the fine-tuned TorchScript
    second = _decided(second)
    assert second.decision in (Decision.PROMOTED, Decision.KEPT), second.reason
    assert second.metric == "accuracy" and second.champion == first.challenger
    assert 0.5 < second.champion_score <= 1 and 0.5 < second.challenger_score <= 1
    assert f"challenger {second.challenger_score:.4g} vs champion" in second.reason


def v1_model(v1: dict):
    from r1platform.registry.models import ModelVersion

    return ModelVersion.objects.get(pk=v1["id"]).model
