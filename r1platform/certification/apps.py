from __future__ import annotations

from django.apps import AppConfig


class CertificationConfig(AppConfig):
    name = "r1platform.certification"
    label = "certification"

    def ready(self) -> None:
        # Connects the receivers of jobs' signals: jobs sits below certification and cannot call it.
        from r1platform.certification import signals  # noqa: F401
