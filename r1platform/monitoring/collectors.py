"""Levels read when Prometheus scrapes: jobs, queues, workers, their GPUs, schedules.

These are the platform's state now, so they are read from the database (five queries whatever
the fleet's size; the job counts come from one index, not the rows) and the broker at scrape time
rather than kept as gauges in some process: any web process answers the same, and nothing goes
stale when a process dies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from django.db import DatabaseError
from django.db.models import Count
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from r1platform.jobs.models import Job, JobStatus
from r1platform.queues import Queue
from r1platform.workers.models import Worker
from r1platform.workers.services import WorkerState, worker_state

log = logging.getLogger(__name__)

# The broker gets this long to answer for all queues; past it the scrape goes on without depths.
BROKER_TIMEOUT_SECONDS = 2.0

# Every family PlatformCollector yields (tests check rules and panels against them).
FAMILIES = (
    "r1_jobs",
    "r1_queued_jobs",
    "r1_queue_depth",
    "r1_broker_up",
    "r1_workers",
    "r1_worker_up",
    "r1_worker_last_heartbeat_timestamp_seconds",
    "r1_gpu_utilization_ratio",
    "r1_gpu_memory_used_bytes",
    "r1_gpu_memory_total_bytes",
    "r1_schedules",
    "r1_schedule_runs",
)


class PlatformCollector:
    """A prometheus-client custom collector over the database and the broker."""

    def collect(self) -> Iterator[Metric]:
        yield from _jobs()
        queued = _queued_jobs()
        yield queued.family
        workers = list(Worker.objects.only("hostname", "queues", "last_seen", "stopped_at", "gpus"))
        states = {w.hostname: worker_state(w) for w in workers}
        yield from _workers(workers, states)
        yield from _gpus([w for w in workers if states[w.hostname] is WorkerState.LIVE])
        known = {q.value for q in Queue} | queued.queues
        for w in workers:
            if states[w.hostname] is WorkerState.LIVE:
                known.update(w.queues)
        yield from _broker(sorted(known))
        yield from _schedules()


SERVING_PREFIX = "r1_serving_"


class ProcessFilesCollector:
    """The samples every process wrote under a multiprocess folder, added up.

    prometheus-client's ``MultiProcessCollector`` reads one folder. Processes in different PID
    namespaces (one container each) must write to different folders, or two processes with the
    same pid would share a file; so each service writes to a folder of its own under one shared
    volume and the web process reads them all, its own folder and every one below it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def collect(self) -> Iterable[Metric]:
        files = sorted(str(p) for p in self.path.rglob("*.db")) if self.path.is_dir() else []
        # The certification's serving-contract check runs the serving runtime inside a worker,
        # which writes serving samples here too. They are no pool's traffic: serving metrics come
        # only from each serving process's own /metrics, where the alert rules read them.
        return [
            metric
            for metric in MultiProcessCollector.merge(files, accumulate=True)
            if not metric.name.startswith(SERVING_PREFIX)
        ]


class DefaultRegistryCollector:
    """This process's own default registry, for a platform run without multiprocess mode."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


# -- jobs ---------------------------------------------------------------------------------------


def _jobs() -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "r1_jobs",
        "Jobs by status now; queued and running jobs also by their current stage",
        labels=["status", "stage"],
    )
    counts: dict[tuple[str, str], int] = {(status, ""): 0 for status in JobStatus.values}
    rows = Job.objects.order_by().values_list("status", "current_stage").annotate(n=Count("pk"))
    for status, stage, n in rows:
        # A finished job's last stage says nothing about now: count it under its status only.
        key = (status, stage if status in (JobStatus.QUEUED, JobStatus.RUNNING) else "")
        counts[key] = counts.get(key, 0) + n
    for (status, stage), n in sorted(counts.items()):
        family.add_metric([status, stage], n)
    yield family


class _Queued:
    def __init__(self, family: GaugeMetricFamily, queues: set[str]) -> None:
        self.family, self.queues = family, queues


def _queued_jobs() -> _Queued:
    family = GaugeMetricFamily(
        "r1_queued_jobs",
        "Jobs waiting to be claimed, by the queue they were sent to",
        labels=["queue"],
    )
    counts = {q.value: 0 for q in Queue}
    rows = (
        Job.objects.filter(status=JobStatus.QUEUED)
        .order_by()
        .values_list("queue")
        .annotate(n=Count("pk"))
    )
    counts.update({queue: n for queue, n in rows})
    for queue, n in sorted(counts.items()):
        family.add_metric([queue], n)
    return _Queued(family, set(counts))


# -- workers and their GPUs ---------------------------------------------------------------------


def _workers(workers: list[Worker], states: dict[str, WorkerState]) -> Iterator[Metric]:
    by_state = GaugeMetricFamily(
        "r1_workers", "Workers by state (live, lost, stopped)", labels=["state"]
    )
    counts = {state.value: 0 for state in WorkerState}
    for state in states.values():
        counts[state.value] += 1
    for state, n in counts.items():
        by_state.add_metric([state], n)
    yield by_state

    # A worker that said it stopped is not down: only live (1) and lost (0) workers are listed,
    # so an alert on 0 means a worker vanished without stopping.
    up = GaugeMetricFamily(
        "r1_worker_up",
        "1 while a worker beats, 0 once it is lost (stopped ones are left out)",
        labels=["hostname"],
    )
    beat = GaugeMetricFamily(
        "r1_worker_last_heartbeat_timestamp_seconds",
        "When each worker last beat, in Unix seconds",
        labels=["hostname"],
    )
    for w in workers:
        if states[w.hostname] is not WorkerState.STOPPED:
            up.add_metric([w.hostname], 1 if states[w.hostname] is WorkerState.LIVE else 0)
        beat.add_metric([w.hostname], w.last_seen.timestamp())
    yield up
    yield beat


def _gpus(live: list[Worker]) -> Iterator[Metric]:
    """The last GPU sample of each live worker (a lost worker's sample is no longer true)."""
    labels = ["hostname", "gpu", "name"]
    util = GaugeMetricFamily(
        "r1_gpu_utilization_ratio", "Fraction of time a kernel ran on the GPU, 0..1", labels=labels
    )
    used = GaugeMetricFamily("r1_gpu_memory_used_bytes", "GPU memory in use", labels=labels)
    total = GaugeMetricFamily("r1_gpu_memory_total_bytes", "GPU memory in all", labels=labels)
    for w in live:
        for gpu in w.gpus or []:
            try:
                values = [w.hostname, str(gpu["index"]), str(gpu["name"])]
                if gpu.get("utilization") is not None:
                    util.add_metric(values, float(gpu["utilization"]))
                used.add_metric(values, float(gpu["memory_used_bytes"]))
                total.add_metric(values, float(gpu["memory_total_bytes"]))
            except (KeyError, TypeError, ValueError):
                log.warning("worker %s stored a GPU sample this cannot read: %r", w.hostname, gpu)
    # Without a GPU anywhere the families are left out, not listed empty.
    yield from (family for family in (util, used, total) if family.samples)


# -- the broker ---------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_running = threading.Event()


def _broker(queues: list[str]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "r1_queue_depth", "Messages waiting in the broker, by queue", labels=["queue"]
    )
    up = GaugeMetricFamily(
        "r1_broker_up", "1 when the broker answered this scrape within its time, else 0"
    )
    found = queue_depths(queues)
    for queue, n in sorted((found or {}).items()):
        depth.add_metric([queue], n)
    up.add_metric([], 0 if found is None else 1)
    yield depth
    yield up


def queue_depths(queues: list[str], timeout: float | None = None) -> dict[str, int] | None:
    """Messages waiting in each queue, or None when the broker did not answer within ``timeout``.

    The broker is asked on a thread of its own so a broker that hangs cannot hang the scrape.
    While a probe is still stuck, later scrapes do not start another one (no pile of threads).
    """
    timeout = BROKER_TIMEOUT_SECONDS if timeout is None else timeout
    with _probe_lock:
        if _probe_running.is_set():
            return None
        _probe_running.set()
    result: dict[str, int] = {}
    done = threading.Event()

    def probe() -> None:
        try:
            result.update(_ask_broker(queues, timeout))
            done.set()
        except Exception as exc:  # noqa: BLE001 - no depths this scrape; the next one asks again
            log.warning("could not read queue depths from the broker: %s", exc)
        finally:
            _probe_running.clear()

    threading.Thread(target=probe, name="r1-queue-depth", daemon=True).start()
    return dict(result) if done.wait(timeout) else None


def _ask_broker(queues: list[str], timeout: float) -> dict[str, int]:
    from kombu.exceptions import ChannelError

    from r1platform.celery import app

    depths: dict[str, int] = {}
    # Socket timeouts (used by Redis; other transports ignore them) so a stuck probe ends too.
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    with app.connection_for_read(transport_options=options) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        channel = conn.channel()
        try:
            for queue in queues:
                try:
                    depths[queue] = channel.queue_declare(queue=queue, passive=True).message_count
                except ChannelError:
                    # Never declared (Redis has no key for an empty queue): nothing waits in it.
                    depths[queue] = 0
        finally:
            channel.close()
    return depths


# -- schedules ----------------------------------------------------------------------------------


def _schedules() -> Iterator[Metric]:
    from r1platform.schedules.models import Decision, Schedule, ScheduleRun

    schedules = GaugeMetricFamily(
        "r1_schedules", "Retraining schedules, enabled or not", labels=["enabled"]
    )
    runs = GaugeMetricFamily(
        "r1_schedule_runs", "Schedule runs recorded, by decision", labels=["decision"]
    )
    try:
        enabled = dict(Schedule.objects.order_by().values_list("enabled").annotate(n=Count("pk")))
        decisions = dict(
            ScheduleRun.objects.order_by().values_list("decision").annotate(n=Count("pk"))
        )
    except DatabaseError as exc:
        # The schedules tables are not migrated yet: leave these families out.
        log.debug("no schedule metrics: %s", exc)
        return
    for flag in (True, False):
        schedules.add_metric([str(flag).lower()], enabled.get(flag, 0))
    for decision in Decision.values:
        runs.add_metric([decision], decisions.get(decision, 0))
    yield schedules
    yield runs
