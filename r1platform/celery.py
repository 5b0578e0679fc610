"""The Celery app: every CELERY_* Django setting configures it."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")

app = Celery("r1platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.imports = ["gpu_workers.tasks"]

# Workers report their hardware profiles and beat (signal handlers; Django is imported lazily).
import gpu_workers.lifecycle  # noqa: E402,F401
