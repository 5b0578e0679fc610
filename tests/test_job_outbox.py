"""The job outbox, with a broker stand-in that can be down: a send that fails never raises and
leaves the job stored, the sweep sends it once, the API answers a JSON 503 and the same key sends
it later; certification launches are idempotent under a race; every /api/ error is JSON.

The real broker outage (a redis-server killed and started again, a real worker) is
tests/test_outage_broker.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError

from r1platform.celery import app
from r1platform.certification import services as certification
from r1platform.certification.models import Certification
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job, JobStatus
from r1platform.queues import TaskName
from r1platform.schedules.models import Decision
from tests.schedules_pages_data import (  # noqa: F401 - fixtures, registered by name
    certify_stage_fixture,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    schedule_fixture,
    template_fixture,
    training_fixture,
)

STAGES = [{"name": "benchmark", "settings": {"batch_sizes": [1], "iterations": 5}}]


class Broker:
    """Stands in for ``app.send_task``: takes job messages while up, refuses them while down."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[int] = []
        self.tries = 0

    def send_task(self, name: str, args: list, **options) -> None:
        assert name == TaskName.RUN_JOB.value
        self.tries += 1
        if self.down:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append(args[0])


@pytest.fixture
def broker(monkeypatch) -> Broker:
    fake = Broker()
    monkeypatch.setattr(app, "send_task", fake.send_task)
    return fake


def launch(version, user, key: str | None = None) -> Job:
    return jobs.launch_job(version=version, user=user, stages=STAGES, idempotency_key=key)[0]


def age(job: Job, seconds: float = 60) -> None:
    """Make the job look launched ``seconds`` ago (older than the sweep's grace)."""
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(seconds=seconds))


def post_job(api, version, key: str | None = None):
    body = {"version_id": version.pk, "stages": STAGES, "idempotency_key": key}
    return api.post("/api/v1/jobs", body, content_type="application/json")


# -- sending and the sweep -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_send_the_broker_refuses_does_not_raise_and_leaves_the_job_stored(
    version, user, broker, caplog
):
    broker.down = True

    job = launch(version, user)

    job.refresh_from_db()
    assert job.status == JobStatus.QUEUED and job.sent_at is None and job.send_attempts == 1
    assert jobs.waits_for_broker(job)
    assert "did not take its message" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_a_job_the_broker_takes_is_recorded_as_sent(version, user, broker):
    job = launch(version, user)

    job.refresh_from_db()
    assert broker.sent == [job.pk]
    assert job.sent_at is not None and job.send_attempts == 1
    assert not jobs.waits_for_broker(job)


@pytest.mark.django_db(transaction=True)
def test_the_sweep_sends_an_unsent_job_once_when_the_broker_is_back(version, user, broker):
    broker.down = True
    job = launch(version, user)
    broker.down = False

    assert jobs.send_unsent_jobs() == 0, "a job this young may still be being sent"
    age(job)
    assert jobs.send_unsent_jobs() == 1
    assert jobs.send_unsent_jobs() == 0

    job.refresh_from_db()
    assert broker.sent == [job.pk]
    assert job.sent_at is not None and job.send_attempts == 2


@pytest.mark.django_db(transaction=True)
def test_the_sweep_leaves_sent_finished_and_cancelled_jobs_alone(version, user, broker):
    sent = launch(version, user)
    broker.down = True
    cancelled = jobs.cancel_job(launch(version, user))
    for job in (sent, cancelled):
        age(job)
    broker.down = False

    assert jobs.send_unsent_jobs() == 0
    assert broker.sent == [sent.pk]


@pytest.mark.django_db(transaction=True)
def test_a_sweep_stops_at_the_first_refusal_while_the_broker_is_still_down(version, user, broker):
    broker.down = True
    for _ in range(3):
        age(launch(version, user))
    tries = broker.tries

    assert jobs.send_unsent_jobs() == 0

    assert broker.tries == tries + 1, "one refused send, not one timeout per job"


@pytest.mark.django_db(transaction=True)
def test_two_senders_that_read_the_same_unsent_job_send_it_once(version, user, broker):
    broker.down = True
    job = launch(version, user)
    broker.down = False
    first, second = Job.objects.get(pk=job.pk), Job.objects.get(pk=job.pk)

    assert jobs.send_unsent(first) is True
    assert jobs.send_unsent(second) is False

    assert broker.sent == [job.pk]


@pytest.mark.django_db(transaction=True)
def test_the_beat_task_and_a_worker_that_becomes_ready_sweep(version, user, broker):
    from r1platform.jobs.tasks import sweep_outbox, sweep_when_ready

    broker.down = True
    one = launch(version, user)
    age(one)
    broker.down = False
    assert sweep_outbox.run() == 1

    broker.down = True
    two = launch(version, user)
    age(two)
    broker.down = False
    sweep_when_ready(sender=None)

    assert broker.sent == [one.pk, two.pk]


# -- the API and the dashboard ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_a_json_503_and_the_same_key_sends_the_job_once_the_broker_is_back(
    api, version, broker
):
    broker.down = True

    refused = post_job(api, version, key="launch-7")

    assert refused.status_code == 503
    assert refused["Content-Type"] == "application/json; charset=utf-8"
    assert int(refused["Retry-After"]) > 0
    body = refused.json()
    job = Job.objects.get()
    assert body["job_id"] == job.pk and body["idempotency_key"] == "launch-7"
    assert f"job {job.pk} is stored" in body["detail"] and "same idempotency_key" in body["detail"]
    assert job.status == JobStatus.QUEUED and job.sent_at is None

    broker.down = False
    again = post_job(api, version, key="launch-7")

    assert again.status_code == 200, again.content
    assert again.json()["id"] == job.pk and Job.objects.count() == 1
    assert broker.sent == [job.pk]
    assert post_job(api, version, key="launch-7").status_code == 200
    assert broker.sent == [job.pk], "a sent job is not sent again"


@pytest.mark.django_db(transaction=True)
def test_a_503_without_a_key_names_the_generated_key_to_retry_with(api, version, broker):
    broker.down = True
    key = post_job(api, version).json()["idempotency_key"]
    broker.down = False

    assert post_job(api, version, key=key).status_code == 200
    assert Job.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_launch_says_the_job_waits_for_the_broker(member_client, version, broker):
    broker.down = True
    url = f"{reverse('jobs:job_new')}?version={version.pk}"
    data = {"idempotency_key": "form-1", "include_benchmark": "on", "settings_benchmark": "{}"}

    response = member_client.post(url, data, follow=True)

    job = Job.objects.get()
    assert response.status_code == 200
    assert response.redirect_chain[-1][0] == job.get_absolute_url()
    page = response.content.decode()
    assert f"Job {job.pk} is saved" in page and "cannot be reached" in page


@pytest.mark.django_db(transaction=True)
def test_a_certification_launched_while_the_broker_is_down_is_a_503_then_200(
    api, version, ort, broker
):
    broker.down = True
    body = {"version_id": version.pk, "profile": ort.key, "idempotency_key": "cert-down"}

    refused = api.post("/api/v1/certifications", body, content_type="application/json")

    assert refused.status_code == 503, refused.content
    cert = Certification.objects.get()
    assert refused.json()["job_id"] == cert.job_id
    broker.down = False
    again = api.post("/api/v1/certifications", body, content_type="application/json")
    assert again.status_code == 200 and again.json()["id"] == cert.pk
    assert broker.sent == [cert.job_id]


@pytest.mark.django_db(transaction=True)
def test_a_schedule_run_now_while_the_broker_is_down_does_not_wedge_the_schedule(
    api, schedule, broker
):
    broker.down = True

    response = api.post(f"/api/v1/schedules/{schedule.pk}/run", {}, content_type="application/json")

    assert response.status_code == 201, response.content
    run = response.json()
    job = Job.objects.get(pk=run["job_id"])
    assert run["decision"] == Decision.RUNNING and jobs.waits_for_broker(job)
    broker.down = False
    age(job)
    assert jobs.send_unsent_jobs() == 1
    assert broker.sent == [job.pk]


# -- certification idempotency ---------------------------------------------------------------------


def test_two_certification_launches_racing_on_one_key_give_one_certification_201_then_200(
    api, version, ort, enqueued, monkeypatch
):
    """The second request reads "no job with this key" while the first has not committed yet,
    then finds the first's job when it inserts its own: it must answer 200 with the first's
    certification, not a second 201."""
    body = {"version_id": version.pk, "profile": ort.key, "idempotency_key": "race-1"}
    served = certification._served_profile
    first: list[Certification] = []

    def the_other_request_commits_first(profile_key: str):
        monkeypatch.setattr(certification, "_served_profile", served)
        first.append(
            certification.launch_certification(
                version=version,
                profile_key=ort.key,
                level="basic",
                user=None,
                idempotency_key="race-1",
            )
        )
        return served(profile_key)

    monkeypatch.setattr(certification, "_served_profile", the_other_request_commits_first)

    response = api.post("/api/v1/certifications", body, content_type="application/json")

    assert response.status_code == 200, response.content
    assert response.json()["id"] == first[0].pk
    assert Certification.objects.count() == 1 and Job.objects.count() == 1


# -- every /api/ error is JSON ---------------------------------------------------------------------


def test_an_exception_in_an_api_view_is_a_logged_json_500(api, version, monkeypatch, caplog):
    def broken(**kwargs):
        raise RuntimeError("the database said no")

    monkeypatch.setattr(jobs, "launch_job", broken)

    response = post_job(api, version)

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert "internal error" in response.json()["detail"]
    assert "the database said no" not in response.content.decode()
    assert "RuntimeError: the database said no" in caplog.text


def test_an_error_outside_the_views_is_json_under_api_and_html_elsewhere(
    token, monkeypatch, settings
):
    settings.DEBUG = False

    def broken(self, request):
        raise RuntimeError("a middleware failed")

    monkeypatch.setattr(AuthenticationMiddleware, "process_request", broken)
    client = Client(raise_request_exception=False, HTTP_AUTHORIZATION=f"Bearer {token}")

    api_answer = client.get("/api/v1/jobs")
    page = client.get("/jobs/")

    assert api_answer.status_code == 500
    assert api_answer["Content-Type"] == "application/json"
    assert "internal error" in api_answer.json()["detail"]
    assert page.status_code == 500 and page["Content-Type"].startswith("text/html")


def test_an_unknown_api_path_is_a_json_404_and_other_pages_stay_html(api):
    missing = api.get("/api/v1/no-such-thing")
    page = api.get("/no-such-page/")

    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"
    assert "no such API path" in missing.json()["detail"]
    assert page.status_code == 404 and page["Content-Type"].startswith("text/html")
