"""A worker reports itself when it starts, beats while it runs, and says when it stops.

Connected to Celery's signals when a worker or beat loads ``gpu_workers.tasks``: on set-up the
worker adds one queue per hardware profile it offers (``r1platform.queues.profile_queue``), so
jobs that must run on a profile (certifications) reach only workers of that profile; once ready
it records itself and its profiles in the database and a thread in the main process beats every
``R1_WORKER_BEAT_SECONDS``.

A worker that starts holds no job, so once ready it also takes back what an earlier process of
the same name held when it died (``jobs.services.recover_restarted_worker``): compose restarts a
killed ``cpu@%h`` under the same name, which the reaper never sees as lost. When the database
cannot be reached at that moment, the beat thread does both once it can; a beat that fails drops
its connection, so the next one opens a new one (a database restart is survived).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from celery.signals import (
    beat_init,
    celeryd_after_setup,
    worker_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

log = logging.getLogger(__name__)

_state: dict[str, Any] = {"profiles": [], "beat": None, "started": None}


@celeryd_after_setup.connect
def add_profile_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    from django.utils import timezone

    from pipelines.certification.profiles import detect_profiles
    from r1platform.queues import profile_queue

    # Before any message is taken: every job claimed before this was claimed by another process.
    _state["started"] = timezone.now()
    profiles = detect_profiles()
    _state["profiles"] = profiles
    for profile in profiles:
        instance.app.amqp.queues.select_add(profile_queue(profile.key))
    log.info("hardware profiles: %s", ", ".join(p.key for p in profiles) or "none")


class _Beat(threading.Thread):
    def __init__(self, hostname: str, every: float, pending: Callable[[], bool] | None) -> None:
        super().__init__(name="r1-worker-beat", daemon=True)
        self.hostname, self.every = hostname, every
        self.pending = pending  # the start-up report, until it has been made
        self.stopped = threading.Event()

    def run(self) -> None:
        from gpu_workers.dbretry import reset_connection
        from gpu_workers.nvml import sample_gpus
        from r1platform.workers import services

        try:
            while not self.stopped.wait(self.every):
                if self.pending is not None and self.pending():
                    self.pending = None
                try:
                    services.beat(self.hostname, gpus=[g.as_dict() for g in sample_gpus()])
                except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the thread
                    log.warning("worker beat failed: %s", exc)
                    # The connection may be dead (the database restarted): the next beat opens
                    # a new one instead of failing on it for good.
                    reset_connection()
        finally:
            reset_connection()


def _start_up(hostname: str, queues: list[str], started: datetime) -> bool:
    """Record this worker and take back what its name held before; whether that was done."""
    from gpu_workers.dbretry import reset_connection
    from r1platform.jobs import services as jobs
    from r1platform.workers import services

    try:
        services.report_worker(hostname, queues, _state["profiles"], pid=os.getpid())
        moved = jobs.recover_restarted_worker(hostname, started)
    except Exception as exc:  # noqa: BLE001 - the worker still works; the beat thread tries again
        log.error("could not record this worker and take back its jobs (retrying): %s", exc)
        reset_connection()
        return False
    for job_id, outcome in moved:
        log.warning("job %s, held by this worker's name before it restarted: %s", job_id, outcome)
    return True


@worker_ready.connect
def report(sender: Any, **kwargs: Any) -> None:
    from django.conf import settings
    from django.utils import timezone

    hostname = sender.hostname
    queues = [q.name for q in sender.app.amqp.queues.consume_from.values()]
    started = _state["started"] or timezone.now()
    done = _start_up(hostname, queues, started)
    pending = None if done else (lambda: _start_up(hostname, queues, started))
    beat = _Beat(hostname, settings.R1_WORKER_BEAT_SECONDS, pending)
    beat.start()
    _state["beat"] = beat


@worker_shutdown.connect
def stopped(sender: Any, **kwargs: Any) -> None:
    from r1platform.workers import services

    beat = _state.get("beat")
    if beat is not None:
        beat.stopped.set()
    try:
        services.worker_stopped(sender.hostname if hasattr(sender, "hostname") else str(sender))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record this worker's stop: %s", exc)


# -- prometheus-client's multiprocess mode (r1platform.monitoring) ------------------------------


@worker_init.connect
@beat_init.connect
def metrics_folder(sender: Any = None, **kwargs: Any) -> None:
    # Before the pool forks: children write their samples there from their first stage on.
    from r1platform.monitoring.multiprocess import ensure_folder

    ensure_folder()


@worker_process_shutdown.connect
def metrics_process_dead(sender: Any = None, pid: int | None = None, **kwargs: Any) -> None:
    # Sent in the pool child as it exits; a child that is killed outright sends nothing, and only
    # live-mode gauges (none are written today) would need this.
    from r1platform.monitoring.multiprocess import process_dead

    process_dead(pid or os.getpid())
