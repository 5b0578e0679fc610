"""The schedules' Celery tasks (found by ``app.autodiscover_tasks``): thin shells over ``runs``."""

from __future__ import annotations

from r1platform.celery import app
from r1platform.queues import TaskName
from r1platform.schedules import runs


# On the default queue (cpu): a tick only reads the database and launches a job.
@app.task(name=TaskName.RUN_SCHEDULE.value, ignore_result=True, acks_late=True)
def run_schedule(schedule_id: int) -> None:
    """One beat tick of a schedule: launch its run, or record why not (the service says)."""
    runs.run_schedule(schedule_id, trigger="beat")


@app.task(
    name=TaskName.DECIDE_SCHEDULE_RUN.value,
    ignore_result=True,
    acks_late=True,
    # Sent to the pool's profile queue: champion and challenger are scored on that hardware.
    reject_on_worker_lost=True,
)
def decide_schedule_run(run_id: int) -> None:
    runs.decide_run(run_id)
