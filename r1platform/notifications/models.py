"""What a team wants to be told (a webhook, email recipients, which events) and what was sent.

Only ``notifications.services`` writes these rows: ``update_settings`` validates every field
first, ``notify`` records one ``Delivery`` per channel, and ``deliver`` records each attempt.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from r1platform.accounts.models import Team


class NotificationSettings(models.Model):
    """A team's notification channels; a team without this row is sent nothing."""

    team = models.OneToOneField(
        Team, on_delete=models.CASCADE, related_name="notification_settings"
    )
    webhook_url = models.CharField(max_length=500, blank=True)
    # Kept in clear because each body is signed with it (HMAC-SHA256); never shown back.
    webhook_secret = models.CharField(max_length=200, blank=True)
    emails = models.JSONField(default=list, blank=True)
    # The events turned *off*, so an event added to the platform later is on by default.
    events_off = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "notification settings"

    def __str__(self) -> str:
        return f"notifications of {self.team}"

    def is_on(self, event: str) -> bool:
        return event not in self.events_off


class Channel(models.TextChoices):
    WEBHOOK = "webhook"
    EMAIL = "email"


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class Delivery(models.Model):
    """One notification on one channel, through all its attempts."""

    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=60)
    channel = models.CharField(max_length=10, choices=Channel.choices)
    # The webhook URL or the email recipients (comma-separated) at the time it was queued.
    target = models.CharField(max_length=2000)
    payload = models.JSONField()
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    response_status = models.PositiveIntegerField(null=True, blank=True)
    # How long the last webhook attempt took to answer (or fail); the answer's body is never kept.
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["team", "-created_at"], name="delivery_team_recent")]
        verbose_name_plural = "deliveries"

    def __str__(self) -> str:
        return f"{self.event} by {self.channel} to {self.target} ({self.status})"
