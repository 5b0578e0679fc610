"""A real broker outage: the platform's broker is a private redis-server (tests/own_redis.py),
killed while a job is launched through the API and started again with a real worker.

The job must be stored and answered with a JSON 503 (not an HTML 500, not lost), and once the
broker and a worker are back it runs to its end exactly once, with nobody launching it again.
"""

from __future__ import annotations

import re
import time

import pytest

from r1platform.certification.models import Certification
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.schedules.models import Decision
from tests.conftest import running_worker, wait_for_job
from tests.own_redis import celery_broker, own_redis
from tests.schedules_pages_data import (  # noqa: F401 - fixtures, registered by name
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    schedule_fixture,
    template_fixture,
    training_fixture,
)

pytestmark = pytest.mark.django_db(transaction=True)

STAGES = [{"name": "benchmark", "settings": {"batch_sizes": [1], "iterations": 5}}]
# The worker's broker timeout: its start-up sweep sends jobs older than twice this.
WORKER_BROKER_TIMEOUT = 1


def post_job(api, version, key: str):
    body = {"version_id": version.pk, "stages": STAGES, "idempotency_key": key}
    return api.post("/api/v1/jobs", body, content_type="application/json")


def test_a_job_launched_while_the_broker_is_down_is_a_503_and_runs_once_when_it_is_back(
    api, version, tmp_path
):
    with own_redis() as redis, celery_broker(redis.url):
        redis.kill()

        started = time.monotonic()
        refused = post_job(api, version, "outage-1")
        took = time.monotonic() - started

        assert refused.status_code == 503, refused.content
        assert refused["Content-Type"] == "application/json; charset=utf-8"
        assert int(refused["Retry-After"]) > 0
        job = Job.objects.get(pk=refused.json()["job_id"])
        assert (job.status, job.sent_at, job.send_attempts) == (JobStatus.QUEUED, None, 1)
        assert took < 5, f"the request waited {took:.1f} s on the dead broker"
        again = post_job(api, version, "outage-1")
        assert again.status_code == 503 and again.json()["job_id"] == job.pk
        assert Job.objects.count() == 1

        redis.start()
        # Older than the worker's grace, so its start-up sweep takes it (no beat in this test).
        time.sleep(max(0.0, 2.5 * WORKER_BROKER_TIMEOUT - (time.monotonic() - started)))
        env = {"CELERY_BROKER_URL": redis.url, "R1_BROKER_TIMEOUT_SECONDS": "1"}
        with running_worker(tmp_path / "worker.log", **env) as worker:
            done = wait_for_job(job.pk, timeout=90)
            log = worker.log_path.read_text()

        assert done.status == JobStatus.SUCCEEDED, done.error
        assert done.attempts == 1, "claimed once"
        assert done.sent_at is not None and done.send_attempts == 3
        assert len(re.findall(r"r1\.run_job\[[^\]]+\] received", log)) == 1, "one message"
        answered = post_job(api, version, "outage-1")
        assert answered.status_code == 200 and answered.json()["status"] == "succeeded"


def test_certification_and_schedule_launches_while_the_broker_is_down_do_not_500(
    api, version, ort, schedule
):
    with own_redis() as redis, celery_broker(redis.url):
        redis.kill()
        body = {"version_id": version.pk, "profile": ort.key, "idempotency_key": "cert-1"}

        cert = api.post("/api/v1/certifications", body, content_type="application/json")
        run = api.post(f"/api/v1/schedules/{schedule.pk}/run", {}, content_type="application/json")

        assert cert.status_code == 503, cert.content
        assert cert["Content-Type"].startswith("application/json") and cert["Retry-After"]
        assert cert.json()["job_id"] == Certification.objects.get().job_id
        assert run.status_code == 201, run.content
        assert run.json()["decision"] == Decision.RUNNING
        waiting = Job.objects.get(pk=run.json()["job_id"])
        assert jobs.waits_for_broker(waiting)

        redis.start()
        Job.objects.update(created_at=waiting.created_at.replace(year=2000))
        assert jobs.send_unsent_jobs() == 2
        assert not Job.objects.filter(sent_at__isnull=True).exists()
