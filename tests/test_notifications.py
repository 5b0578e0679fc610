"""Team notifications: settings validation, the JSON webhook (signed, retried, timed out), email,
the dashboard page and the API. Webhooks go to a real HTTP server (pytest-httpserver) on this
machine, which R1_WEBHOOK_ALLOW_NETWORKS allows here (tests/test_webhook_addresses.py checks it is
refused by default); email to Django's locmem backend; the retry path runs on a real Celery
worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socket
import time

import pytest
from django.core import mail
from django.core.exceptions import ValidationError
from django.db import transaction
from django.test import TestCase
from django.urls import reverse
from werkzeug import Request, Response

from r1platform.notifications import services
from r1platform.notifications.delivery import TransientDeliveryError, deliver
from r1platform.notifications.models import Delivery, DeliveryStatus, NotificationSettings
from r1platform.notifications.services import (
    SCHEDULE_RUN_FAILED,
    SCHEDULE_RUN_PROMOTED,
    notify,
)
from r1platform.notifications.tasks import deliver_notification
from tests.conftest import running_worker

PAYLOAD = {"schedule": "nightly digits", "run_id": 7, "reason": "accuracy 0.81 < 0.9"}
LOOPBACK = "127.0.0.0/8,::1/128"


@pytest.fixture(autouse=True)
def allow_loopback_webhooks(settings):
    """pytest-httpserver listens on this machine, which webhooks may reach only when allowed."""
    settings.R1_WEBHOOK_ALLOW_NETWORKS = LOOPBACK


def configure(team, **fields) -> NotificationSettings:
    values = {"webhook_url": "", "emails": [], "events": list(services.EVENTS), **fields}
    return services.update_settings(team, **values)


def notify_in_transaction(team, event=SCHEDULE_RUN_FAILED, payload=PAYLOAD):
    """``notify`` as the schedule code calls it; the enqueue callbacks are captured, not run."""
    with TestCase.captureOnCommitCallbacks(execute=False) as callbacks, transaction.atomic():
        deliveries = notify(team, event, payload)
    return deliveries, callbacks


# -- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://files.example.com/hook", "http:// or https://"),
        ("javascript:alert(1)", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("example.com/hook", "http:// or https://"),
        ("http:///no-host", "must name a host"),
        ("https://example.com:port/x", "invalid port"),
    ],
)
def test_it_refuses_a_webhook_url_that_is_not_http_with_a_host(member_client, team, url, says):
    response = member_client.post(
        reverse("notifications:save", args=[team.pk]),
        {f"team-{team.pk}-webhook_url": url, f"team-{team.pk}-events": [SCHEDULE_RUN_FAILED]},
    )

    assert response.status_code == 400
    assert says in response.content.decode()
    assert not NotificationSettings.objects.exists()
    with pytest.raises(ValidationError, match=re.escape(says)):
        services.check_webhook_url(url)


def test_it_refuses_a_bad_email_address(team):
    with pytest.raises(ValidationError) as refused:
        configure(team, webhook_url="https://example.com/hook", emails="ops@example.com, nope")

    assert refused.value.message_dict == {"emails": ["'nope' is not an email address."]}
    assert not NotificationSettings.objects.exists()


def test_it_saves_settings_from_the_dashboard(member_client, team):
    prefix = f"team-{team.pk}-"
    response = member_client.post(
        reverse("notifications:save", args=[team.pk]),
        {
            prefix + "webhook_url": " https://hooks.example.com/r1 ",
            prefix + "webhook_secret": "s3cret",
            prefix + "emails": "a@example.com\nb@example.com; a@example.com",
            prefix + "events": [SCHEDULE_RUN_FAILED],
        },
    )

    assert response.status_code == 302
    config = NotificationSettings.objects.get(team=team)
    assert config.webhook_url == "https://hooks.example.com/r1"
    assert config.webhook_secret == "s3cret"
    assert config.emails == ["a@example.com", "b@example.com"]
    assert config.is_on(SCHEDULE_RUN_FAILED) and not config.is_on(SCHEDULE_RUN_PROMOTED)
    page = member_client.get(reverse("notifications:index")).content.decode()
    assert "s3cret" not in page, "the secret is never shown back"
    assert "https://hooks.example.com/r1" in page


def test_it_reads_and_replaces_settings_over_the_api(api, team):
    assert api.get("/api/v1/notifications").json()["events"] == list(services.EVENTS)

    refused = api.put(
        "/api/v1/notifications",
        {"webhook_url": "file:///etc/passwd"},
        content_type="application/json",
    )
    assert refused.status_code == 400
    assert "http:// or https://" in refused.json()["detail"]
    assert not NotificationSettings.objects.exists()

    saved = api.put(
        "/api/v1/notifications",
        {"webhook_url": "https://example.com/h", "webhook_secret": "k", "emails": ["o@x.io"]},
        content_type="application/json",
    )
    assert saved.status_code == 200
    assert saved.json()["has_webhook_secret"] is True
    assert NotificationSettings.objects.get(team=team).emails == ["o@x.io"]

    notify(team, SCHEDULE_RUN_PROMOTED, PAYLOAD)
    listed = api.get("/api/v1/notifications/deliveries").json()
    assert sorted((d["channel"], d["status"]) for d in listed) == [
        ("email", "pending"),
        ("webhook", "pending"),
    ]


# -- notify -------------------------------------------------------------------------------------


def test_it_sends_nothing_without_settings_or_for_an_event_turned_off(team):
    assert notify(team, SCHEDULE_RUN_FAILED, PAYLOAD) == []

    configure(team, webhook_url="https://example.com/hook", events=[SCHEDULE_RUN_FAILED])

    deliveries, callbacks = notify_in_transaction(team, SCHEDULE_RUN_PROMOTED)
    assert deliveries == [] and callbacks == []
    assert not Delivery.objects.exists()
    deliveries, callbacks = notify_in_transaction(team, SCHEDULE_RUN_FAILED)
    assert [d.channel for d in deliveries] == ["webhook"] and len(callbacks) == 1


def test_it_queues_nothing_when_the_callers_transaction_rolls_back(team):
    configure(team, webhook_url="https://example.com/hook")

    with pytest.raises(RuntimeError), transaction.atomic():
        notify(team, SCHEDULE_RUN_FAILED, PAYLOAD)
        raise RuntimeError("the schedule's own work failed")

    assert not Delivery.objects.exists()


# -- webhook ------------------------------------------------------------------------------------


def test_it_posts_signed_json_to_the_webhook(team, httpserver):
    httpserver.expect_request("/hook", method="POST").respond_with_data("ok")
    configure(team, webhook_url=httpserver.url_for("/hook"), webhook_secret="s3cret")

    (delivery,), callbacks = notify_in_transaction(team)
    assert len(callbacks) == 1 and not httpserver.log, "nothing is sent before commit"
    assert deliver(delivery.pk) == DeliveryStatus.SENT

    ((request, _response),) = httpserver.log
    body = request.get_data()
    assert json.loads(body) == {
        "event": SCHEDULE_RUN_FAILED,
        "team": "team-a",
        "sent_at": delivery.payload["sent_at"],
        "data": PAYLOAD,
    }
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert request.headers["X-R1-Signature"] == expected
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("r1platform-webhooks/")
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("sent", 1, 200)
    assert delivery.sent_at is not None
    assert deliver(delivery.pk) == DeliveryStatus.SENT and len(httpserver.log) == 1, "sent once"


def test_it_fails_a_404_at_once_without_retrying(team, httpserver):
    httpserver.expect_request("/gone", method="POST").respond_with_data("no such hook", 404)
    configure(team, webhook_url=httpserver.url_for("/gone"))
    (delivery,), _ = notify_in_transaction(team)

    result = deliver_notification.apply(args=[delivery.pk])  # the task itself, in this process

    assert result.successful() and result.result == DeliveryStatus.FAILED
    assert len(httpserver.log) == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.response_status) == ("failed", 1, 404)
    assert "404 Not Found" in delivery.last_error and "permanent" in delivery.last_error
    assert "no such hook" not in delivery.last_error, "the answer's body is never recorded"


def test_a_slow_webhook_does_not_hold_up_the_caller_and_records_a_timeout(
    team, httpserver, settings
):
    settings.R1_WEBHOOK_TIMEOUT_SECONDS = 0.3

    def slow(request: Request) -> Response:
        time.sleep(1.0)
        return Response("late")

    httpserver.expect_request("/slow").respond_with_handler(slow)
    configure(team, webhook_url=httpserver.url_for("/slow"))

    started = time.monotonic()
    (delivery,), _ = notify_in_transaction(team)
    assert time.monotonic() - started < 0.3
    assert not httpserver.log, "the webhook is not called inside the caller's transaction"

    with pytest.raises(TransientDeliveryError):
        deliver(delivery.pk)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert "did not answer within 0.3 s" in delivery.last_error

    assert deliver(delivery.pk, last_try=True) == DeliveryStatus.FAILED
    delivery.refresh_from_db()
    assert delivery.last_error.startswith("gave up after 2 attempts: the webhook did not answer")


def test_the_delivery_task_retries_transient_errors_only_with_backoff(settings):
    task = deliver_notification
    assert task.autoretry_for == (TransientDeliveryError,)
    assert task.retry_backoff == settings.R1_WEBHOOK_BACKOFF_SECONDS and task.retry_jitter is True
    assert task.retry_backoff_max == 600
    assert task.max_retries == settings.R1_WEBHOOK_MAX_RETRIES
    assert (task.acks_late, task.ignore_result) == (True, True)


@pytest.fixture
def loopback_worker(transactional_db, tmp_path):
    """The ``worker`` fixture's worker, allowed to post to this machine."""
    with running_worker(tmp_path / "worker.log", R1_WEBHOOK_ALLOW_NETWORKS=LOOPBACK) as proc:
        yield proc


@pytest.mark.worker
def test_a_webhook_answering_503_twice_is_delivered_by_the_worker_after_retries(
    loopback_worker, team, httpserver
):
    for _ in range(2):
        httpserver.expect_ordered_request("/flaky").respond_with_data("busy", status=503)
    httpserver.expect_ordered_request("/flaky").respond_with_data("ok")
    configure(team, webhook_url=httpserver.url_for("/flaky"))

    (delivery,) = notify(team, SCHEDULE_RUN_FAILED, PAYLOAD)  # autocommit: enqueued at once

    deadline = time.monotonic() + 30
    while delivery.status == DeliveryStatus.PENDING and time.monotonic() < deadline:
        time.sleep(0.2)
        delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENT, delivery.last_error
    assert (delivery.attempts, delivery.response_status, delivery.last_error) == (3, 200, "")
    assert len(httpserver.log) == 3
    httpserver.check_assertions()


# -- email --------------------------------------------------------------------------------------


def test_it_emails_through_django_mail_settings(team, settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.DEFAULT_FROM_EMAIL = "r1@example.com"
    configure(team, emails=["ops@example.com", "ml@example.com"])
    (delivery,), _ = notify_in_transaction(team)

    assert deliver(delivery.pk) == DeliveryStatus.SENT

    (message,) = mail.outbox
    assert message.to == ["ops@example.com", "ml@example.com"]
    assert message.from_email == "r1@example.com"
    assert message.subject == "[r1platform] Team A: A scheduled run failed"
    assert "reason: accuracy 0.81 < 0.9" in message.body
    assert "schedule: nightly digits" in message.body


def test_an_unreachable_mail_server_is_a_transient_error(team, settings):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
    configure(team, emails=["ops@example.com"])
    (delivery,), _ = notify_in_transaction(team)

    with pytest.raises(TransientDeliveryError):
        deliver(delivery.pk)
    delivery.refresh_from_db()
    assert delivery.status == "pending" and "mail server failed" in delivery.last_error


# -- dashboard ----------------------------------------------------------------------------------


def test_send_a_test_goes_through_the_same_path(member_client, team, httpserver):
    configure(team, webhook_url=httpserver.url_for("/hook"), events=[])

    response = member_client.post(reverse("notifications:send_test", args=[team.pk]))

    assert response.status_code == 302
    (delivery,) = Delivery.objects.filter(team=team)
    assert (delivery.event, delivery.channel) == ("test", "webhook")
    assert "sent by alice" in delivery.payload["data"]["message"]


def test_send_a_test_says_so_when_there_is_nowhere_to_send(member_client, team):
    response = member_client.post(reverse("notifications:send_test", args=[team.pk]), follow=True)

    assert "Nothing to send" in response.content.decode()
    assert not Delivery.objects.exists()


def test_it_shows_only_the_users_teams_deliveries(member_client, team, other_team):
    for t in (team, other_team):
        Delivery.objects.create(
            team=t,
            event=SCHEDULE_RUN_FAILED,
            channel="webhook",
            target=f"https://{t.slug}.example.com/hook",
            payload={},
        )

    page = member_client.get(reverse("notifications:index")).content.decode()
    assert "https://team-a.example.com/hook" in page
    assert "team-b.example.com" not in page
    poll = member_client.get(reverse("notifications:index"), HTTP_HX_REQUEST="true")
    assert "team-a.example.com" in poll.content.decode()
    assert "team-b.example.com" not in poll.content.decode()
    assert "<form" not in poll.content.decode(), "the poll answers the table alone"


def test_a_member_of_another_team_cannot_change_or_test_its_settings(client, team, outsider):
    client.force_login(outsider)
    prefix = f"team-{team.pk}-"
    save = client.post(
        reverse("notifications:save", args=[team.pk]), {prefix + "webhook_url": "https://x.io"}
    )
    test = client.post(reverse("notifications:send_test", args=[team.pk]))

    assert save.status_code == 404 and test.status_code == 404
    assert not NotificationSettings.objects.exists()
