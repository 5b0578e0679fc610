"""The reaper's Celery task (found by ``app.autodiscover_tasks``); beat sends it every minute."""

from __future__ import annotations

from r1platform.celery import app
from r1platform.jobs.services import reap_lost_workers
from r1platform.queues import TaskName


@app.task(name=TaskName.REAP.value, ignore_result=True)
def reap() -> int:
    """Recover the stale running jobs of lost workers (scheduled by beat every minute)."""
    return len(reap_lost_workers())
