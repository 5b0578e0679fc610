"""Notifications to a team: a webhook (JSON POST, retried with backoff) and email.

CONTRACT (being filled in): ``notify`` is the one entry point; it records what is to be sent and
queues the deliveries after commit, so the caller never waits on a slow webhook.
"""

from __future__ import annotations

from typing import Any

from r1platform.accounts.models import Team

# Events a team can be told about.
SCHEDULE_RUN_FAILED = "schedule.run.failed"
SCHEDULE_RUN_PROMOTED = "schedule.run.promoted"
SCHEDULE_RUN_REQUESTED = "schedule.run.requested"
EVENTS = (SCHEDULE_RUN_FAILED, SCHEDULE_RUN_PROMOTED, SCHEDULE_RUN_REQUESTED)


def notify(team: Team, event: str, payload: dict[str, Any]) -> None:
    """Queue the team's webhook and email for ``event`` (nothing if the team set none)."""
    raise NotImplementedError
