from __future__ import annotations

from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "r1platform.schedules"
    label = "schedules"

    def ready(self) -> None:
        # Connects the receiver of jobs' end: jobs sits below schedules and cannot call it.
        from r1platform.schedules import signals  # noqa: F401
