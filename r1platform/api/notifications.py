"""The team's notification settings over the API (``/api/v1/notifications``)."""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.http import HttpRequest
from ninja import Router, Schema, Status

from r1platform.api.auth import team_id
from r1platform.api.schemas import ErrorOut, page_limit
from r1platform.notifications import services
from r1platform.notifications.models import Delivery, NotificationSettings

router = Router(tags=["notifications"])


class NotificationSettingsOut(Schema):
    webhook_url: str
    has_webhook_secret: bool
    emails: list[str]
    events: list[str]
    known_events: list[str]

    @staticmethod
    def resolve_has_webhook_secret(config: NotificationSettings) -> bool:
        # The secret itself is never answered, only whether there is one.
        return bool(config.webhook_secret)

    @staticmethod
    def resolve_events(config: NotificationSettings) -> list[str]:
        return [e for e in services.EVENTS if config.is_on(e)]

    @staticmethod
    def resolve_known_events(config: NotificationSettings) -> list[str]:
        return list(services.EVENTS)


class NotificationSettingsIn(Schema):
    webhook_url: str = ""
    # Omitted or null keeps the current secret; "" removes it.
    webhook_secret: str | None = None
    emails: list[str] = []
    events: list[str] = list(services.EVENTS)


class DeliveryOut(Schema):
    id: int
    event: str
    channel: str
    target: str
    status: str
    attempts: int
    last_error: str
    response_status: int | None
    created_at: datetime
    sent_at: datetime | None


def _team(request: HttpRequest):
    return request.auth.team  # type: ignore[attr-defined]


@router.get("/notifications", response=NotificationSettingsOut)
def get_notification_settings(request: HttpRequest):
    """Where the team is told about scheduled runs, and which events are on."""
    return services.settings_for(_team(request))


@router.put("/notifications", response={200: NotificationSettingsOut, 400: ErrorOut})
def put_notification_settings(request: HttpRequest, payload: NotificationSettingsIn):
    """Replace the team's settings; 400 with the reason (nothing saved) for a URL that is not
    http(s), an address that is not one, or an unknown event."""
    try:
        config = services.update_settings(_team(request), **payload.model_dump())
    except ValidationError as exc:
        detail = "; ".join(f"{field}: {' '.join(m)}" for field, m in exc.message_dict.items())
        return Status(400, {"detail": detail})
    return config


@router.get("/notifications/deliveries", response=list[DeliveryOut])
def list_deliveries(request: HttpRequest, status: str = "", limit: int = 50, offset: int = 0):
    """The team's deliveries, newest first, with their attempts and last error."""
    found = Delivery.objects.filter(team_id=team_id(request))
    if status:
        found = found.filter(status=status)
    return found[offset : offset + page_limit(limit)]
