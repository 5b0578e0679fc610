"""A worker killed outright and restarted under the same name takes back what it held.

Compose restarts a killed ``cpu@%h`` under the same name, so the reaper never sees a lost worker,
and the broker would hand the unacknowledged message back only after its visibility timeout
(hours on Redis; never on the filesystem broker, which forgets a message once delivered). The
real tests kill a real worker's main process and pool with SIGKILL mid-job and start another
under the same name; the unit tests cover each way ``recover_restarted_worker`` moves a job.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from r1platform.core import tracking
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.signals import job_finished
from r1platform.registry.models import BenchmarkResult
from tests.conftest import running_worker, wait_for_job, wait_for_run_status

# A benchmark of the upload alone, about 1 s per batch size: long enough to be killed in.
SLOW_BENCHMARK = {
    "name": "benchmark",
    "settings": {
        "batch_sizes": [1, 2, 3, 4, 5, 6, 7, 8],
        "warmup": 2,
        "iterations": 5,
        "min_seconds": 0.3,
        "agreement": 0.0,
        "max_windows": 3,
    },
}


@pytest.fixture
def ended(db) -> list[tuple[int, str]]:
    """The (job id, status) of every ``job_finished`` announced during the test."""
    seen: list[tuple[int, str]] = []

    def receiver(sender, job, **kwargs):
        seen.append((job.pk, job.status))

    job_finished.connect(receiver, dispatch_uid="test_outage_worker.ended")
    yield seen
    job_finished.disconnect(dispatch_uid="test_outage_worker.ended")


def _held(version, host: str, *, claimed_ago: float = 30, attempts: int = 1, run: str = "") -> Job:
    """A job running on ``host``, claimed ``claimed_ago`` seconds ago, its heartbeat fresh."""
    now = timezone.now()
    return Job.objects.create(
        team_id=version.team_id,
        version=version,
        stages=[SLOW_BENCHMARK],
        queue="cpu",
        idempotency_key=uuid.uuid4().hex,
        status=JobStatus.RUNNING,
        worker_host=host,
        attempts=attempts,
        started_at=now - timedelta(seconds=claimed_ago),
        heartbeat_at=now,
        mlflow_run_id=run,
    )


def _mlflow_run(job_name: str) -> str:
    return tracking.start_run(tracking.experiment_id("team-a"), job_name, {})


# -- the recovery, one case at a time ---------------------------------------------------------


def test_a_restarted_worker_requeues_what_its_previous_process_held(version, enqueued, ended):
    job = _held(version, "cpu@box")

    moved = jobs.recover_restarted_worker("cpu@box", timezone.now())

    job.refresh_from_db()
    assert moved == [(job.pk, jobs.Recovered.REQUEUED)]
    assert job.status == JobStatus.QUEUED and enqueued == [job.pk] and ended == []
    assert "re-queued: worker cpu@box restarted" in job.log_tail
    assert jobs.claim_job(job.pk, "cpu@box").attempts == 2


def test_it_ends_a_held_job_whose_cancel_was_asked_as_any_job_ends(version, enqueued, ended):
    run_id = _mlflow_run("held-cancelled")
    job = _held(version, "cpu@box", run=run_id)
    jobs.cancel_job(job)

    jobs.recover_restarted_worker("cpu@box", timezone.now())

    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert "cancelled: worker cpu@box restarted" in job.log_tail
    assert enqueued == [] and ended == [(job.pk, JobStatus.CANCELLED)]
    assert tracking.client().get_run(run_id).info.status == "FAILED"  # no longer RUNNING


def test_it_fails_a_held_job_past_the_attempts_limit(version, enqueued, ended):
    job = _held(version, "cpu@box", attempts=settings.R1_MAX_JOB_ATTEMPTS)

    jobs.recover_restarted_worker("cpu@box", timezone.now())

    job.refresh_from_db()
    assert job.status == JobStatus.FAILED and enqueued == []
    assert "the worker cpu@box restarted while running this job" in job.error
    assert ended == [(job.pk, JobStatus.FAILED)]


def test_it_leaves_jobs_claimed_since_it_started_and_other_workers_jobs_alone(version, enqueued):
    started = timezone.now() - timedelta(seconds=5)
    mine_now = _held(version, "cpu@box", claimed_ago=1)  # claimed by this very process
    elsewhere = _held(version, "cpu@other")

    assert jobs.recover_restarted_worker("cpu@box", started) == []
    assert {j.status for j in Job.objects.filter(pk__in=[mine_now.pk, elsewhere.pk])} == {
        JobStatus.RUNNING
    }
    assert enqueued == []


def test_the_reapers_end_is_announced_and_closes_the_mlflow_run(version, enqueued, ended):
    from r1platform.workers import services as workers
    from r1platform.workers.models import Worker

    workers.report_worker("gone@box", ["cpu"], [])
    Worker.objects.filter(hostname="gone@box").update(
        last_seen=timezone.now() - timedelta(seconds=settings.R1_WORKER_LOST_SECONDS + 10)
    )
    run_id = _mlflow_run("reaped")
    job = _held(version, "gone@box", run=run_id)
    stale = timezone.now() - timedelta(seconds=settings.R1_HEARTBEAT_STALE + 10)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=stale, cancel_requested=True)

    assert [r.outcome for r in jobs.reap_lost_workers()] == ["cancelled"]

    assert ended == [(job.pk, JobStatus.CANCELLED)]
    assert tracking.client().get_run(run_id).info.status == "FAILED"


# -- real workers, killed and restarted under the same name -----------------------------------


def _launch(api, version) -> int:
    payload = {"version_id": version.pk, "stages": [SLOW_BENCHMARK]}
    response = api.post("/api/v1/jobs", payload, content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def _kill_mid_benchmark(proc, job_id: int) -> Job:
    """SIGKILL the worker (main process and pool) once the job is half-way; the job then."""
    deadline = time.monotonic() + 60
    while True:
        job = Job.objects.get(pk=job_id)
        if job.status == JobStatus.RUNNING and job.progress >= 0.25:
            break
        assert time.monotonic() < deadline and not job.is_finished, job.log_tail
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return Job.objects.get(pk=job_id)


def _wait_for_log(path, text: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} x{count} not in:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.worker
def test_a_worker_restarted_under_its_name_finishes_its_job_once(
    transactional_db, api, version, tmp_path
):
    name = f"restart-{uuid.uuid4().hex[:6]}@%h"
    with running_worker(tmp_path / "first.log", name=name) as first:
        job_id = _launch(api, version)
        held = _kill_mid_benchmark(first, job_id)
    assert held.status == JobStatus.RUNNING and held.attempts == 1

    with running_worker(tmp_path / "second.log", name=name) as second:
        job = wait_for_job(job_id, timeout=45)
        assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
        assert job.attempts == 2 and job.worker_host == held.worker_host
        assert f"re-queued: worker {held.worker_host} restarted" in job.log_tail
        rows = BenchmarkResult.objects.filter(job=job)
        assert rows.count() == len(SLOW_BENCHMARK["settings"]["batch_sizes"])
        assert wait_for_run_status(job.mlflow_run_id) == "FINISHED"

        # The message the killed process held comes back one day (the visibility timeout):
        # that delivery finds the job finished and does nothing.
        log = second.log_path
        nothing_before = log.read_text().count(": 'nothing'")
        jobs.enqueue(job)
        _wait_for_log(log, ": 'nothing'", nothing_before + 1)
        again = Job.objects.get(pk=job_id)
        assert (again.status, again.attempts, again.finished_at) == (
            JobStatus.SUCCEEDED,
            2,
            job.finished_at,
        )
        assert BenchmarkResult.objects.filter(job=job).count() == rows.count()


@pytest.mark.worker
def test_a_job_cancelled_while_its_worker_was_dead_ends_when_it_restarts(
    transactional_db, api, version, tmp_path
):
    name = f"restart-{uuid.uuid4().hex[:6]}@%h"
    with running_worker(tmp_path / "first.log", name=name) as first:
        job_id = _launch(api, version)
        _kill_mid_benchmark(first, job_id)
    response = api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200, response.content
    assert Job.objects.get(pk=job_id).status == JobStatus.RUNNING  # only asked: no one runs it

    with running_worker(tmp_path / "second.log", name=name):
        job = wait_for_job(job_id, timeout=20)
    assert job.status == JobStatus.CANCELLED and job.attempts == 1
    assert "restarted" in job.log_tail
    assert wait_for_run_status(job.mlflow_run_id) == "FAILED"
