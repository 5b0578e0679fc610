"""The workers page and API, and the reaper that recovers the stale jobs of lost workers."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from pipelines.certification.profiles import HardwareProfile as Profile
from r1platform.jobs import services as jobs
from r1platform.jobs import tasks
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.models import RegisteredModel
from r1platform.registry.services import register_version
from r1platform.workers import services
from r1platform.workers.models import Worker

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

CPU = Profile(
    backend="onnxruntime",
    backend_version="1.31.1",
    device_kind="cpu",
    device_name="Test CPU",
    isa=("avx2",),
    total_memory_mb=1000.0,
)
URL = reverse("workers:worker_list")


def ago(seconds: float):
    return timezone.now() - timedelta(seconds=seconds)


def make_worker(hostname: str, *, silent_for: float = 0, stopped: bool = False) -> Worker:
    services.report_worker(hostname, ["cpu", "profile." + CPU.key], [CPU], pid=7)
    Worker.objects.filter(hostname=hostname).update(
        last_seen=ago(silent_for), stopped_at=timezone.now() if stopped else None
    )
    return Worker.objects.get(hostname=hostname)


def make_job(team, *, host: str = "", status=JobStatus.RUNNING, beat_ago=0, attempts=1) -> Job:
    model, _ = RegisteredModel.objects.get_or_create(
        team=team, name="mine", defaults={"mlflow_name": f"{team.slug}.mine"}
    )
    version = register_version(
        model,
        relative_file="models/x.onnx",
        sha256="a" * 64,
        size_bytes=10,
        format="onnx",
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    return Job.objects.create(
        team=team,
        version=version,
        stages=[{"name": "benchmark", "settings": {}}],
        queue="cpu",
        idempotency_key=uuid.uuid4().hex,
        status=status,
        worker_host=host,
        attempts=attempts,
        started_at=ago(beat_ago),
        heartbeat_at=ago(beat_ago),
    )


def lost() -> float:
    return settings.R1_WORKER_LOST_SECONDS + 10


def stale() -> float:
    return settings.R1_HEARTBEAT_STALE + 10


# -- the page --------------------------------------------------------------------------------------


def test_it_sends_anonymous_users_to_log_in(client, db):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse(settings.LOGIN_URL) + "?next=")


def test_it_lists_live_lost_and_stopped_workers(member_client):
    make_worker("live@a")
    make_worker("lost@b", silent_for=lost())
    make_worker("stopped@c", silent_for=lost(), stopped=True)

    response = member_client.get(URL)

    html = response.content.decode()
    assert response.status_code == 200
    states = {r.worker.hostname: r.state for r in response.context["rows"]}
    assert states == {"live@a": "live", "lost@b": "lost", "stopped@c": "stopped"}
    assert 'data-hostname="lost@b" data-state="lost"' in html
    assert CPU.key in html and CPU.label in html and "profile." + CPU.key in html
    assert f"{int(lost())} s ago" in html
    assert 'hx-trigger="every 5s"' in html
    assert 'data-testid="nav-workers"' in html


def test_a_worker_that_beats_again_is_live_again(db):
    make_worker("w@a", silent_for=lost(), stopped=True)
    services.beat("w@a")
    assert services.worker_state(Worker.objects.get(hostname="w@a")) == "live"


def test_it_links_the_current_job_of_the_users_team_only(member_client, team, other_team):
    make_worker("w1@a")
    make_worker("w2@b")
    mine = make_job(team, host="w1@a")
    theirs = make_job(other_team, host="w2@b")
    make_job(team, host="w2@b", status=JobStatus.SUCCEEDED)  # finished: not current

    html = member_client.get(URL).content.decode()

    assert f'href="{mine.get_absolute_url()}"' in html and f"job #{mine.pk}" in html
    assert "a job of another team" in html
    assert theirs.get_absolute_url() not in html and f"job #{theirs.pk}" not in html
    assert html.count('data-testid="worker-job"') == 2


def test_an_htmx_poll_gets_the_table_only(member_client):
    make_worker("w1@a")

    response = member_client.get(URL, HTTP_HX_REQUEST="true")

    html = response.content.decode()
    assert response.status_code == 200
    assert html.lstrip().startswith('<section id="workers-table"')
    assert "w1@a" in html and "<html" not in html


# -- the reaper ------------------------------------------------------------------------------------


def test_it_requeues_the_stale_job_of_a_lost_worker(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=stale())

    reaped = jobs.reap_lost_workers()

    job.refresh_from_db()
    assert reaped == [jobs.Reaped(job.pk, "gone@a", "requeued")]
    assert job.status == JobStatus.QUEUED
    assert enqueued == [job.pk]
    assert "re-queued: worker gone@a lost" in job.log_tail
    assert Worker.objects.get(hostname="gone@a").stopped_at is None  # it stays lost
    claimed = jobs.claim_job(job.pk, "new@b")
    assert claimed is not None and claimed.attempts == 2


def test_it_fails_a_job_whose_workers_were_lost_too_often(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=stale(), attempts=settings.R1_MAX_JOB_ATTEMPTS)

    reaped = jobs.reap_lost_workers()

    job.refresh_from_db()
    assert [r.outcome for r in reaped] == ["failed"]
    assert job.status == JobStatus.FAILED and job.finished_at is not None
    assert "the worker gone@a was lost while running this job" in job.error
    assert f"{settings.R1_MAX_JOB_ATTEMPTS} times" in job.error
    assert enqueued == []


def test_it_cancels_instead_of_requeueing_a_job_whose_cancel_was_asked(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=stale())
    Job.objects.filter(pk=job.pk).update(cancel_requested=True)

    jobs.reap_lost_workers()

    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and enqueued == []


def test_it_leaves_a_job_with_a_fresh_heartbeat_alone(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=0)

    assert jobs.reap_lost_workers() == []
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING and enqueued == []


@pytest.mark.parametrize("stopped", [False, True], ids=["live", "stopped"])
def test_it_leaves_the_jobs_of_live_and_stopped_workers_alone(db, team, enqueued, stopped):
    make_worker("here@a", silent_for=lost() if stopped else 0, stopped=stopped)
    job = make_job(team, host="here@a", beat_ago=stale())

    assert jobs.reap_lost_workers() == []
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING and enqueued == []


def test_reaping_twice_requeues_once(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=stale())

    first, second = jobs.reap_lost_workers(), jobs.reap_lost_workers()

    assert len(first) == 1 and second == []
    assert enqueued == [job.pk]
    assert jobs.recover_from_lost_worker(job.pk, "gone@a") is None  # a late second reaper


def test_a_job_a_live_worker_claimed_meanwhile_is_left_alone(db, team, enqueued):
    make_worker("gone@a", silent_for=lost())
    job = make_job(team, host="gone@a", beat_ago=stale())
    assert jobs.claim_job(job.pk, "new@b") is not None  # the redelivered message, elsewhere

    assert jobs.recover_from_lost_worker(job.pk, "gone@a") is None
    job.refresh_from_db()
    assert job.status == JobStatus.RUNNING and job.worker_host == "new@b" and enqueued == []


def test_the_command_and_the_task_run_the_reaper(db, team, enqueued, capsys):
    make_worker("gone@a", silent_for=lost())
    first = make_job(team, host="gone@a", beat_ago=stale())

    call_command("reap")
    assert f"job {first.pk}: requeued (worker gone@a lost)" in capsys.readouterr().out

    Job.objects.filter(pk=first.pk).update(status=JobStatus.RUNNING)
    assert tasks.reap() == 1
    assert enqueued == [first.pk, first.pk]
    assert settings.CELERY_BEAT_SCHEDULE["reap-lost-workers"]["task"] == tasks.reap.name


# -- the API ---------------------------------------------------------------------------------------


def test_the_api_lists_workers_with_the_teams_jobs_only(api, team, other_team):
    make_worker("w1@a")
    make_worker("w2@b", silent_for=lost())
    mine = make_job(team, host="w1@a")
    make_job(other_team, host="w2@b")

    response = api.get("/api/v1/workers")

    assert response.status_code == 200
    found = {w["hostname"]: w for w in response.json()}
    assert found["w1@a"]["state"] == "live" and found["w2@b"]["state"] == "lost"
    assert found["w1@a"]["profiles"] == [CPU.key]
    assert found["w1@a"]["queues"] == sorted(["cpu", "profile." + CPU.key])
    assert found["w1@a"]["current_job_ids"] == [mine.pk]
    assert found["w2@b"]["current_job_ids"] == []


def test_the_api_needs_a_token(client, db):
    assert client.get("/api/v1/workers").status_code == 401
