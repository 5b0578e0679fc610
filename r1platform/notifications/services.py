"""Notifications to a team: a webhook (JSON POST, retried with backoff) and email.

``notify`` is the one entry point; it records what is to be sent and queues the deliveries after
commit, so the caller never waits on a slow webhook. ``update_settings`` is the one place that
validates and saves a team's channels (used by the dashboard form and the API).
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.core.validators import validate_email
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from r1platform.accounts.models import Team
from r1platform.celery import app
from r1platform.notifications import addresses
from r1platform.notifications.models import Channel, Delivery, NotificationSettings
from r1platform.queues import Queue, TaskName

log = logging.getLogger(__name__)

# Events a team can be told about.
SCHEDULE_RUN_FAILED = "schedule.run.failed"
SCHEDULE_RUN_PROMOTED = "schedule.run.promoted"
SCHEDULE_RUN_REQUESTED = "schedule.run.requested"
EVENTS = (SCHEDULE_RUN_FAILED, SCHEDULE_RUN_PROMOTED, SCHEDULE_RUN_REQUESTED)
# Sent by the dashboard's "Send a test" button; always on, so the button always proves the path.
TEST = "test"

EVENT_LABELS = {
    SCHEDULE_RUN_FAILED: "A scheduled run failed",
    SCHEDULE_RUN_PROMOTED: "A scheduled run promoted a version",
    SCHEDULE_RUN_REQUESTED: "A scheduled run asks for approval",
    TEST: "Test notification",
}

WEBHOOK_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 500
MAX_EMAILS = 20


def check_webhook_url(url: str) -> str:
    """The URL, stripped, if it is http(s) with a host; ``ValidationError`` saying why if not.

    Only http and https are ever requested: a ``file:``, ``ftp:`` or ``javascript:`` URL would
    make the worker read or run something other than a web request. Nor may the host be, or
    resolve to, an address inside the platform's network (``addresses``).
    """
    url = url.strip()
    if not url:
        return ""
    if len(url) > MAX_URL_LENGTH:
        raise ValidationError(f"The webhook URL is longer than {MAX_URL_LENGTH} characters.")
    if any(c.isspace() for c in url):
        raise ValidationError("The webhook URL must not contain spaces.")
    parts = urlsplit(url)
    if parts.scheme.lower() not in WEBHOOK_SCHEMES:
        shown = f"{parts.scheme}:" if parts.scheme else "no scheme"
        raise ValidationError(
            f"The webhook URL must start with http:// or https:// (got {shown}); "
            "only web requests are sent."
        )
    try:
        host, _port = parts.hostname, parts.port  # .port raises on a port that is not a number
    except ValueError:
        raise ValidationError("The webhook URL has an invalid port.") from None
    if not host:
        raise ValidationError("The webhook URL must name a host, as in https://example.com/hook.")
    check_webhook_host(host, _port or (443 if parts.scheme.lower() == "https" else 80))
    return url


def check_webhook_host(host: str, port: int) -> None:
    """``ValidationError`` if the host is, or resolves to, an address webhooks may not reach.

    A name that does not resolve now is let through: it cannot be judged, and every delivery
    resolves and checks it again before sending anything.
    """
    try:
        addresses.vetted(host, port)
    except addresses.UnresolvedHost:
        return
    except addresses.AddressRefused as exc:
        raise ValidationError(
            f"The webhook URL points inside the platform's network: {exc}."
        ) from None


def check_emails(emails: str | list[str]) -> list[str]:
    """Addresses from a list, or from text separated by commas, semicolons or new lines."""
    if isinstance(emails, str):
        emails = emails.replace(";", ",").replace("\n", ",").split(",")
    found: list[str] = []
    for raw in emails:
        address = raw.strip()
        if not address or address in found:
            continue
        try:
            validate_email(address)
        except ValidationError:
            raise ValidationError(f"{address!r} is not an email address.") from None
        found.append(address)
    if len(found) > MAX_EMAILS:
        raise ValidationError(f"At most {MAX_EMAILS} email recipients.")
    return found


def check_events(events: list[str]) -> list[str]:
    unknown = sorted(set(events) - set(EVENTS))
    if unknown:
        raise ValidationError(f"Unknown event(s) {', '.join(unknown)}; known: {', '.join(EVENTS)}.")
    return [e for e in EVENTS if e in events]


def settings_for(team: Team) -> NotificationSettings:
    """The team's settings, or unsaved defaults (no channel, every event on)."""
    found = NotificationSettings.objects.filter(team=team).first()
    return found or NotificationSettings(team=team)


def update_settings(
    team: Team,
    *,
    webhook_url: str,
    emails: str | list[str],
    events: list[str],
    webhook_secret: str | None = None,
) -> NotificationSettings:
    """Validate every field, then save; ``ValidationError`` (by field) and nothing saved if any
    is wrong. ``webhook_secret=None`` keeps the current secret, ``""`` removes it."""
    errors: dict[str, list[str]] = {}
    cleaned: dict[str, Any] = {}
    for field, check, value in (
        ("webhook_url", check_webhook_url, webhook_url),
        ("emails", check_emails, emails),
        ("events", check_events, events),
    ):
        try:
            cleaned[field] = check(value)
        except ValidationError as exc:
            errors[field] = exc.messages
    if webhook_secret is not None and len(webhook_secret) > 200:
        errors["webhook_secret"] = ["The signing secret is longer than 200 characters."]
    if errors:
        raise ValidationError(errors)
    config = settings_for(team)
    config.webhook_url = cleaned["webhook_url"]
    config.emails = cleaned["emails"]
    config.events_off = [e for e in EVENTS if e not in cleaned["events"]]
    if webhook_secret is not None:
        config.webhook_secret = webhook_secret.strip()
    config.updated_at = timezone.now()
    config.save()
    return config


def envelope(team: Team, event: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON every channel sends; the payload is normalised through JSON (dates as ISO)."""
    data = json.loads(json.dumps(payload, cls=DjangoJSONEncoder))
    return {"event": event, "team": team.slug, "sent_at": timezone.now().isoformat(), "data": data}


def notify(team: Team, event: str, payload: dict[str, Any]) -> list[Delivery]:
    """Queue the team's webhook and email for ``event`` (nothing if the team set none).

    Safe inside the caller's transaction: the rows are written with it and the deliveries are
    enqueued only once it commits (none if it rolls back); nothing here touches the network.
    """
    config = NotificationSettings.objects.filter(team=team).first()
    if config is None or (event != TEST and not config.is_on(event)):
        return []
    body = envelope(team, event, payload)
    deliveries: list[Delivery] = []
    if config.webhook_url:
        deliveries.append(Delivery(channel=Channel.WEBHOOK, target=config.webhook_url))
    if config.emails:
        deliveries.append(Delivery(channel=Channel.EMAIL, target=", ".join(config.emails)))
    for delivery in deliveries:
        delivery.team = team
        delivery.event = event
        delivery.payload = body
        delivery.save()
    if deliveries:
        ids = [d.pk for d in deliveries]
        transaction.on_commit(lambda: _enqueue(ids))
    return deliveries


def send_test(team: Team, user: object) -> list[Delivery]:
    who = getattr(user, "get_username", lambda: "someone")()
    return notify(
        team,
        TEST,
        {
            "message": f"A test notification sent by {who} from the dashboard.",
            "url": settings.R1_PUBLIC_URL + reverse("notifications:index"),
        },
    )


def _enqueue(delivery_ids: list[int]) -> None:
    # By name, on the default queue: the task (``notifications.tasks``) imports this module.
    for pk in delivery_ids:
        try:
            app.send_task(
                TaskName.DELIVER_NOTIFICATION.value, args=[pk], queue=Queue.CPU.value, retry=False
            )
        except Exception as exc:  # noqa: BLE001 - a broker outage must not fail what notified
            log.warning("delivery %s not queued (broker unreachable: %s)", pk, exc)
