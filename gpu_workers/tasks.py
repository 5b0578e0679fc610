"""The job task: a thin shell whose decorator holds the policy and whose body makes one call.

Workers and beat load this module by name (``r1platform.celery``: ``imports``), never the web
side. Loading it connects the worker's lifecycle handlers, so a worker adds its profile queues,
reports itself and beats. The other tasks live in their apps' ``tasks.py``.
"""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from gpu_workers import (
    lifecycle,  # noqa: F401 - imported to connect the worker's signal handlers
    runner,
)
from r1platform.celery import app
from r1platform.queues import TaskName


@app.task(
    bind=True,
    name=TaskName.RUN_JOB.value,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
    throws=(SoftTimeLimitExceeded,),
)
def run_job(self, job_id: int) -> str:
    outcome = runner.execute_job(job_id, worker_host=self.request.hostname or "")
    if outcome is runner.Outcome.BUSY:
        # Another worker holds it with a live heartbeat: look again once that would be stale.
        raise self.retry(countdown=settings.R1_HEARTBEAT_STALE)
    return outcome.value
