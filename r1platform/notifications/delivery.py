"""Sending one delivery, a webhook POST or an email, with each attempt recorded on its row.

Runs on a worker (``notifications.tasks.deliver_notification``). A failure worth trying again
(a timeout, a refused connection, a 5xx or 429, an SMTP error) raises ``TransientDeliveryError``
and the task retries it with exponential backoff; anything else fails the row at once.
A webhook whose host is, or resolves to, an address webhooks may not reach (``addresses``) is
failed without a request; each attempt records the answer's status and time, never its body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import time
from http import HTTPStatus
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import requests
import urllib3
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.mail import get_connection, send_mail
from django.db.models import F
from django.urls import reverse
from django.utils import timezone

from r1platform.notifications import addresses
from r1platform.notifications.models import (
    Channel,
    Delivery,
    DeliveryStatus,
    NotificationSettings,
)
from r1platform.notifications.services import EVENT_LABELS

USER_AGENT = "r1platform-webhooks/1"
# Answers that say "not now" rather than "never": worth another attempt later.
RETRY_STATUSES = {408, 425, 429}
# How much of a connection error's text is kept in the log (a receiver's answer never is).
ERROR_LENGTH = 300
# An SMTP server that never answers must not hold a worker process for ever.
EMAIL_TIMEOUT_SECONDS = 30


class DeliveryError(Exception):
    def __init__(self, message: str, response_status: int | None = None) -> None:
        super().__init__(message)
        self.response_status = response_status


class TransientDeliveryError(DeliveryError):
    """Worth trying again later: the task retries it with backoff."""


class PermanentDeliveryError(DeliveryError):
    """Trying again would get the same answer: the delivery fails at once."""


def sign(body: bytes, secret: str) -> str:
    """The ``X-R1-Signature`` header: receivers recompute it over the raw body to verify."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(delivery_id: int, *, last_try: bool = False) -> str:
    """Make one attempt at a pending delivery and record it; returns the status it is left in.

    Raises ``TransientDeliveryError`` when another attempt may succeed, unless ``last_try``, in
    which case the delivery is failed instead. A delivery no longer pending (a message delivered
    twice) is not sent again.
    """
    pending = Delivery.objects.filter(pk=delivery_id, status=DeliveryStatus.PENDING)
    if not pending.update(attempts=F("attempts") + 1):
        status = Delivery.objects.filter(pk=delivery_id).values_list("status", flat=True).first()
        return status or "gone"
    delivery = Delivery.objects.select_related("team").get(pk=delivery_id)
    delivery.duration_ms = None  # set by an attempt that reaches a webhook
    send = post_webhook if delivery.channel == Channel.WEBHOOK else send_email
    try:
        try:
            response_status = send(delivery)
        except SoftTimeLimitExceeded:
            raise TransientDeliveryError("the attempt ran past the task's time limit") from None
    except TransientDeliveryError as exc:
        if last_try:
            tries = f"{delivery.attempts} attempt{'s' if delivery.attempts != 1 else ''}"
            _record(delivery, DeliveryStatus.FAILED, f"gave up after {tries}: {exc}", exc)
            return DeliveryStatus.FAILED
        _record(delivery, DeliveryStatus.PENDING, f"{exc} (will retry)", exc)
        raise
    except PermanentDeliveryError as exc:
        _record(delivery, DeliveryStatus.FAILED, f"{exc} (permanent, not retried)", exc)
        return DeliveryStatus.FAILED
    delivery.status = DeliveryStatus.SENT
    delivery.last_error = ""
    delivery.response_status = response_status
    delivery.sent_at = timezone.now()
    delivery.save(
        update_fields=["status", "last_error", "response_status", "sent_at", "duration_ms"]
    )
    return DeliveryStatus.SENT


def _record(delivery: Delivery, status: str, error: str, exc: DeliveryError) -> None:
    delivery.status = status
    delivery.last_error = error
    delivery.response_status = exc.response_status
    delivery.save(update_fields=["status", "last_error", "response_status", "duration_ms"])


def post_webhook(delivery: Delivery) -> int:
    """POST the payload as JSON; the answer's status if 2xx, else a ``DeliveryError``.

    The host is resolved and checked (``addresses.vetted``) on every attempt, and the request
    goes to the address that was checked. Only the status and the time taken are recorded:
    whatever the receiver answers is never read, so the log cannot echo another service's data.
    """
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"{USER_AGENT} (+{settings.R1_PUBLIC_URL})",
        "X-R1-Event": delivery.event,
        "X-R1-Delivery": str(delivery.pk),
    }
    # The secret in force now, so a secret changed after a failure applies to the retries.
    secret = (
        NotificationSettings.objects.filter(team_id=delivery.team_id)
        .values_list("webhook_secret", flat=True)
        .first()
    )
    if secret:
        headers["X-R1-Signature"] = sign(body, secret)
    parts = urlsplit(delivery.target)
    https = parts.scheme.lower() == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        port = 0
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or not port:
        raise PermanentDeliveryError(f"not sent: {delivery.target!r} is not an http(s) URL")
    try:
        ip = addresses.vetted(parts.hostname, port)[0]
    except addresses.AddressRefused as exc:
        raise PermanentDeliveryError(f"not sent: {exc}") from None
    except addresses.UnresolvedHost as exc:
        raise TransientDeliveryError(str(exc)) from None
    timeout = settings.R1_WEBHOOK_TIMEOUT_SECONDS
    started = time.monotonic()
    try:
        status = _post_to(ip, parts, body, headers, timeout)
    except urllib3.exceptions.TimeoutError:
        raise TransientDeliveryError(f"the webhook did not answer within {timeout} s") from None
    except urllib3.exceptions.SSLError as exc:
        raise TransientDeliveryError(
            f"the TLS handshake with the webhook failed: {_reason(exc)}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise TransientDeliveryError(f"could not connect to the webhook: {_reason(exc)}") from None
    finally:
        delivery.duration_ms = round((time.monotonic() - started) * 1000)
    said = f"the webhook answered {status} {_phrase(status)}".rstrip()
    said += f" in {delivery.duration_ms} ms"
    if 200 <= status < 300:
        return status
    if status >= 500 or status in RETRY_STATUSES:
        raise TransientDeliveryError(said, status)
    if 300 <= status < 400:
        # Not followed: a redirected POST is replayed as a GET by most clients, a receiver that
        # moved should be updated in the settings, and a hop could lead inside the network.
        said += " (redirects are not followed: put the final URL in the settings)"
    raise PermanentDeliveryError(said, status)


def _post_to(
    ip: addresses.IPAddress,
    parts: SplitResult,
    body: bytes,
    headers: dict[str, str],
    timeout: float,
) -> int:
    """POST to ``ip`` with the URL's own Host header and, over https, its name for SNI and the
    certificate check; the answer's status (its body is never read)."""
    headers = {**headers, "Host": parts.netloc.rpartition("@")[2]}
    if parts.username is not None:
        user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers.update(urllib3.util.make_headers(basic_auth=user))
    options: dict[str, Any] = {
        "timeout": urllib3.Timeout(connect=timeout, read=timeout),
        "retries": False,
        "maxsize": 1,
    }
    if parts.scheme.lower() == "https":
        pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(
            str(ip),
            parts.port or 443,
            server_hostname=parts.hostname,
            cert_reqs="CERT_REQUIRED",
            ca_certs=ca_bundle(),
            **options,
        )
    else:
        pool = urllib3.HTTPConnectionPool(str(ip), parts.port or 80, **options)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with pool:
        response = pool.urlopen(
            "POST",
            path,
            body=body,
            headers=headers,
            redirect=False,
            assert_same_host=False,
            preload_content=False,
        )
        response.close()
        return response.status


def ca_bundle() -> str:
    """The certificate authorities https webhooks are checked against (requests' bundle)."""
    return requests.certs.where()


def _phrase(status: int) -> str:
    # Our own words for the status: a receiver's reason phrase is text it chose, like a body.
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _reason(exc: Exception) -> str:
    # urllib3 names its connection first ("HTTPConnection(host=..., port=...): Failed to ...").
    text = str(exc)
    if text.startswith(("HTTPConnection(", "HTTPSConnection(")):
        text = text.partition("): ")[2] or text
    return text[:ERROR_LENGTH]


def send_email(delivery: Delivery) -> None:
    """Send the payload as a plain-text email through Django's mail settings."""
    recipients = [a.strip() for a in delivery.target.split(",") if a.strip()]
    subject, text = email_text(delivery)
    timeout = getattr(settings, "EMAIL_TIMEOUT", None) or EMAIL_TIMEOUT_SECONDS
    try:
        send_mail(
            subject,
            text,
            settings.DEFAULT_FROM_EMAIL,
            recipients,
            connection=get_connection(timeout=timeout),
        )
    except smtplib.SMTPRecipientsRefused as exc:
        refused = "the mail server refused every recipient: " + ", ".join(sorted(exc.recipients))
        raise PermanentDeliveryError(refused) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise TransientDeliveryError(f"the mail server failed: {exc}") from None


def email_text(delivery: Delivery) -> tuple[str, str]:
    """A plain subject and body built from the payload."""
    payload = delivery.payload
    label = EVENT_LABELS.get(delivery.event, delivery.event)
    team = delivery.team.name
    lines = [f"{label} for team {team}.", ""]
    data = payload.get("data") or {}
    for key, value in data.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        lines.append(f"{key}: {shown}")
    lines += [
        "",
        f"event: {delivery.event}",
        f"sent at: {payload.get('sent_at', '')}",
        "",
        "-- ",
        "Sent by r1platform. Choose what your team is sent at "
        f"{settings.R1_PUBLIC_URL}{reverse('notifications:index')}",
    ]
    return f"[r1platform] {team}: {label}", "\n".join(lines)
