"""Celery tasks: thin shells whose decorator holds the policy and whose body makes one call."""

from __future__ import annotations

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from gpu_workers import runner
from r1platform.celery import app
from r1platform.notifications import delivery


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


# On the default queue (cpu): a tick only reads the database and launches a job.
@app.task(name="r1.run_schedule", ignore_result=True, acks_late=True)
def run_schedule(schedule_id: int) -> None:
    """One beat tick of a schedule: launch its run, or record why not (the service says)."""
    from r1platform.schedules import runs as schedules

    schedules.run_schedule(schedule_id, trigger="beat")


@app.task(
    name="r1.decide_schedule_run",
    ignore_result=True,
    acks_late=True,
    # Sent to the pool's profile queue: champion and challenger are scored on that hardware.
    reject_on_worker_lost=True,
)
def decide_schedule_run(run_id: int) -> None:
    from r1platform.schedules import runs as schedules

    schedules.decide_run(run_id)


@app.task(
    bind=True,
    name="r1.deliver_notification",  # on the default queue (cpu): any worker can send it
    ignore_result=True,
    acks_late=True,
    autoretry_for=(delivery.TransientDeliveryError,),
    # BACKOFF, 2×, 4×, ... seconds with full jitter, so receivers are not stampeded.
    retry_backoff=settings.R1_WEBHOOK_BACKOFF_SECONDS,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.R1_WEBHOOK_MAX_RETRIES,
    soft_time_limit=120,
    time_limit=150,
)
def deliver_notification(self, delivery_id: int) -> str:
    # On the last try a transient error fails the delivery instead of leaving it pending.
    return delivery.deliver(delivery_id, last_try=self.request.retries >= self.max_retries)
