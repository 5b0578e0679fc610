"""The Celery app: every CELERY_* Django setting configures it.

Every process imports this module (the web's too), so it imports no worker code: work is sent by
task name (``r1platform.queues.TaskName``), and a worker or beat finds the tasks itself.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")

app = Celery("r1platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The job task lives outside Django's apps, so it is named here, as a string: only a worker or
# beat imports it, and importing it connects the worker's lifecycle handlers (profiles, beats).
app.conf.imports = ["gpu_workers.tasks"]
# The other tasks (schedules, notifications, the reaper) live in their apps' tasks.py.
app.autodiscover_tasks()
