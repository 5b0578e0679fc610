"""The jobs' Celery tasks (found by ``app.autodiscover_tasks``): the reaper, which beat sends every
minute, and the outbox sweep, which beat sends every ``R1_OUTBOX_SWEEP_SECONDS`` and each worker
runs once when it is ready (a broker that was down is back by then)."""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready

from r1platform.celery import app
from r1platform.jobs.services import reap_lost_workers, send_unsent_jobs
from r1platform.queues import TaskName

log = logging.getLogger(__name__)


@app.task(name=TaskName.REAP.value, ignore_result=True)
def reap() -> int:
    """Recover the stale running jobs of lost workers (scheduled by beat every minute)."""
    return len(reap_lost_workers())


@app.task(name=TaskName.SEND_UNSENT_JOBS.value, ignore_result=True)
def sweep_outbox() -> int:
    """Send the queued jobs the broker never took (it was down when they were launched)."""
    return send_unsent_jobs()


@worker_ready.connect
def sweep_when_ready(sender: Any = None, **kwargs: Any) -> None:
    """A worker that starts (often: after the broker came back) sends what waits unsent."""
    from django.db import connection

    try:
        send_unsent_jobs()
    except Exception as exc:  # noqa: BLE001 - the worker works without it; beat sweeps too
        log.warning("could not send the unsent jobs at start-up: %s", exc)
    finally:
        # The main process's connection is not handed to pool children forked later.
        connection.close()
