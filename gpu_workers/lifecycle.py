"""A worker reports itself when it starts, beats while it runs, and says when it stops.

Connected to Celery's signals when a worker or beat loads ``gpu_workers.tasks``: on set-up the
worker adds one queue per hardware profile it offers (``r1platform.queues.profile_queue``), so
jobs that must run on a profile (certifications) reach only workers of that profile; once ready
it records itself and its profiles in the database and a thread in the main process beats every
``R1_WORKER_BEAT_SECONDS``.
"""

from __future__ import annotations

import logging
import os
import threading
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

_state: dict[str, Any] = {"profiles": [], "beat": None}


@celeryd_after_setup.connect
def add_profile_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    from pipelines.certification.profiles import detect_profiles
    from r1platform.queues import profile_queue

    profiles = detect_profiles()
    _state["profiles"] = profiles
    for profile in profiles:
        instance.app.amqp.queues.select_add(profile_queue(profile.key))
    log.info("hardware profiles: %s", ", ".join(p.key for p in profiles) or "none")


class _Beat(threading.Thread):
    def __init__(self, hostname: str, every: float) -> None:
        super().__init__(name="r1-worker-beat", daemon=True)
        self.hostname, self.every = hostname, every
        self.stopped = threading.Event()

    def run(self) -> None:
        from django.db import connection

        from gpu_workers.nvml import sample_gpus
        from r1platform.workers import services

        try:
            while not self.stopped.wait(self.every):
                try:
                    services.beat(self.hostname, gpus=[g.as_dict() for g in sample_gpus()])
                except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the thread
                    log.warning("worker beat failed: %s", exc)
        finally:
            connection.close()


@worker_ready.connect
def report(sender: Any, **kwargs: Any) -> None:
    from django.conf import settings

    from r1platform.workers import services

    hostname = sender.hostname
    queues = [q.name for q in sender.app.amqp.queues.consume_from.values()]
    try:
        services.report_worker(hostname, queues, _state["profiles"], pid=os.getpid())
    except Exception as exc:  # noqa: BLE001 - the worker still works; it is only not listed
        log.error("could not record this worker and its profiles: %s", exc)
    beat = _Beat(hostname, settings.R1_WORKER_BEAT_SECONDS)
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
