"""Celery tasks: thin shells whose decorator holds the policy and whose body makes one call."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from gpu_workers import runner
from r1platform.celery import app


@app.task(
    bind=True,
    name="r1.run_job",
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


@app.task(name="r1.reap", ignore_result=True)
def reap() -> int:
    """Recover the stale running jobs of lost workers (scheduled by beat every minute)."""
    from r1platform.workers.services import reap_lost_workers

    return len(reap_lost_workers())
