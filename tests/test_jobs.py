"""Jobs finish exactly once: claims, poison jobs, live heartbeats, cancelled jobs, corrupt files."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from gpu_workers.runner import Outcome, execute_job
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def job(version, user, monkeypatch):
    monkeypatch.setattr("r1platform.jobs.services.enqueue", lambda job: None)
    stages = [{"name": "benchmark", "settings": {"batch_sizes": [1], "iterations": 5}}]
    return jobs.launch_job(version=version, user=user, stages=stages)[0]


def test_it_claims_a_queued_job_exactly_once(job):
    assert jobs.claim_job(job.pk, "w1") is not None
    assert jobs.claim_job(job.pk, "w2") is None
    job.refresh_from_db()
    assert (job.status, job.worker_host, job.attempts) == (JobStatus.RUNNING, "w1", 1)


def test_it_leaves_a_job_with_a_live_heartbeat_to_its_worker(job):
    jobs.claim_job(job.pk, "w1")
    assert execute_job(job.pk, "w2") is Outcome.BUSY
    job.refresh_from_db()
    assert job.attempts == 1 and job.worker_host == "w1"


def test_it_takes_over_a_job_whose_heartbeat_is_stale(job):
    jobs.claim_job(job.pk, "w1")
    stale = timezone.now() - timedelta(seconds=settings.R1_HEARTBEAT_STALE + 1)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=stale)
    assert jobs.claim_job(job.pk, "w2") is not None
    job.refresh_from_db()
    assert job.attempts == 2 and job.worker_host == "w2"


def test_it_fails_a_poison_job_after_the_worker_died_too_often(job):
    stale = timezone.now() - timedelta(seconds=settings.R1_HEARTBEAT_STALE + 1)
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING,
        attempts=settings.R1_MAX_JOB_ATTEMPTS,
        heartbeat_at=stale,
        current_stage="benchmark",
    )
    assert execute_job(job.pk, "w9") is Outcome.FAILED
    job.refresh_from_db()
    assert job.status == JobStatus.FAILED
    assert f"died {settings.R1_MAX_JOB_ATTEMPTS} times" in job.error
    assert "benchmark" in job.error


def test_it_does_not_run_a_job_cancelled_while_queued(job):
    jobs.cancel_job(job)
    assert execute_job(job.pk, "w1") is Outcome.NOTHING
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.attempts == 0


def test_it_refuses_to_load_a_stored_file_whose_bytes_changed(transactional_db, job, version):
    path = Path(settings.MEDIA_ROOT) / version.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert execute_job(job.pk, "w1") is Outcome.FAILED
    job.refresh_from_db()
    assert "sha256" in job.error
    assert not job.produced.exists()


def test_it_runs_a_job_in_process_and_records_benchmarks(transactional_db, job, version):
    assert execute_job(job.pk, "w1") is Outcome.SUCCEEDED
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED and job.progress == 1.0
    assert version.benchmarks.filter(job=job, batch_size=1).count() == 1
    assert job.mlflow_run_id


def test_it_passes_the_deploy_checks_with_production_settings(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "r1platform.settings",
        "R1_HOME": str(tmp_path),
        "R1_PRODUCTION": "1",
        "R1_SECRET_KEY": secrets.token_urlsafe(60),
    }
    env.pop("R1_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("R1_HEARTBEAT_SECONDS", "soon", "is not an integer"),
        ("R1_DEBUG", "maybe", "is not a boolean"),
        ("R1_HEARTBEAT_STALE", "1", "below its minimum"),
    ],
)
def test_it_fails_loudly_on_a_bad_setting(tmp_path, name, value, message):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "r1platform.settings",
        "R1_HOME": str(tmp_path),
        name: value,
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert name in result.stderr and message in result.stderr


@pytest.mark.parametrize(
    ("stages", "queue"),
    [
        ([{"name": "compile", "settings": {"backend": "onnxruntime"}}], "cpu"),
        ([{"name": "compile", "settings": {"backend": "tensorrt"}}], "gpu"),
        ([{"name": "compile", "settings": {"providers": "cuda"}}], "gpu"),
        ([{"name": "finetune", "settings": {"device": "cuda"}}], "gpu"),
        ([{"name": "benchmark", "settings": {}}], "cpu"),
    ],
)
def test_it_routes_gpu_work_to_the_gpu_queue(stages, queue):
    from r1platform.queues import queue_for

    assert queue_for(stages) == queue
