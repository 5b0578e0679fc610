"""Workers report themselves and their hardware profiles; the platform asks who serves what."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from enum import StrEnum

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from pipelines.certification.profiles import HardwareProfile as Profile
from r1platform.workers.models import HardwareProfile, Worker

_PROFILE_FIELDS = (
    "backend", "backend_version", "device_kind", "device_name", "compute_capability",
    "driver_version", "cuda_version", "total_memory_mb",
)  # fmt: skip


def report_worker(
    hostname: str, queues: Iterable[str], profiles: Iterable[Profile], pid: int | None = None
) -> Worker:
    """Record a starting worker: its queues and the profiles it offers (created or refreshed)."""
    now = timezone.now()
    with transaction.atomic():
        rows = []
        for profile in profiles:
            values = {f: getattr(profile, f) for f in _PROFILE_FIELDS}
            values.update(isa=list(profile.isa), extra=dict(profile.extra), last_seen=now)
            row, _ = HardwareProfile.objects.update_or_create(key=profile.key, defaults=values)
            rows.append(row)
        worker, _ = Worker.objects.update_or_create(
            hostname=hostname,
            defaults={
                "queues": sorted(set(queues)),
                "pid": pid,
                "started_at": now,
                "last_seen": now,
                "stopped_at": None,
            },
        )
        worker.profiles.set(rows)
    return worker


def beat(hostname: str, gpus: Iterable[dict] | None = None) -> None:
    """A worker is alive: its last beat, and its profiles', is now.

    ``gpus`` is the worker's GPU sample (``gpu_workers.nvml``), stored as its last; None leaves
    the stored sample as it is.
    """
    now = timezone.now()
    values: dict[str, object] = {"last_seen": now, "stopped_at": None}
    if gpus is not None:
        values["gpus"] = list(gpus)
    Worker.objects.filter(hostname=hostname).update(**values)
    HardwareProfile.objects.filter(workers__hostname=hostname).update(last_seen=now)


def worker_stopped(hostname: str) -> None:
    Worker.objects.filter(hostname=hostname).update(stopped_at=timezone.now())


def _live_since():
    return timezone.now() - timedelta(seconds=settings.R1_WORKER_LOST_SECONDS)


def live_workers() -> QuerySet[Worker]:
    return Worker.objects.filter(last_seen__gte=_live_since(), stopped_at__isnull=True)


def live_profiles() -> QuerySet[HardwareProfile]:
    """Profiles at least one live worker offers."""
    return HardwareProfile.objects.filter(workers__in=live_workers()).distinct()


def serving_problem(key: str) -> str | None:
    """None if a live worker offers profile ``key``, else why no job for it would be taken."""
    profile = HardwareProfile.objects.filter(key=key).first()
    if profile is None:
        known = ", ".join(live_profiles().values_list("key", flat=True)) or "none"
        return f"no worker has reported a profile {key!r}; profiles served now: {known}"
    if not live_profiles().filter(pk=profile.pk).exists():
        return (
            f"no live worker serves profile {key} ({profile.label}); it was last seen "
            f"{profile.last_seen:%Y-%m-%d %H:%M:%S} UTC. Start a worker on that hardware."
        )
    return None


# -- state (read by the reaper, in jobs.services) --------------------------------------------------


class WorkerState(StrEnum):
    LIVE = "live"
    LOST = "lost"  # no beat for R1_WORKER_LOST_SECONDS, and it did not say it stopped
    STOPPED = "stopped"


def worker_state(worker: Worker) -> WorkerState:
    if worker.stopped_at is not None:
        return WorkerState.STOPPED
    return WorkerState.LIVE if worker.last_seen >= _live_since() else WorkerState.LOST


def lost_workers() -> QuerySet[Worker]:
    return Worker.objects.filter(last_seen__lt=_live_since(), stopped_at__isnull=True)
