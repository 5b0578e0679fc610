"""The workers that reported themselves: ``/api/v1/workers``."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from django.http import HttpRequest
from ninja import Field, Router, Schema

from r1platform.api.auth import team_id
from r1platform.jobs.models import Job, JobStatus
from r1platform.workers.models import Worker
from r1platform.workers.services import worker_state

router = Router(tags=["workers"])


class WorkerOut(Schema):
    hostname: str
    state: Literal["live", "lost", "stopped"] = Field(
        description="lost: no beat for R1_WORKER_LOST_SECONDS and it did not say it stopped."
    )
    queues: list[str]
    profiles: list[str] = Field(description="The keys of the hardware profiles it offers.")
    started_at: datetime
    last_seen: datetime
    current_job_ids: list[int] = Field(
        description="The running jobs it holds that belong to the token's team."
    )

    @staticmethod
    def resolve_state(worker: Worker) -> str:
        return worker_state(worker)

    @staticmethod
    def resolve_profiles(worker: Worker) -> list[str]:
        return [p.key for p in worker.profiles.all()]


@router.get("/workers", response=list[WorkerOut])
def list_workers(request: HttpRequest):
    """Every worker that reported itself, its state, and the team's jobs it runs now."""
    workers = list(Worker.objects.prefetch_related("profiles"))
    running = Job.objects.filter(
        team_id=team_id(request),
        status=JobStatus.RUNNING,
        worker_host__in=[w.hostname for w in workers],
    ).order_by("pk")
    by_host: dict[str, list[int]] = {}
    for host, pk in running.values_list("worker_host", "pk"):
        by_host.setdefault(host, []).append(pk)
    # Which of them are this team's depends on the caller, so it is set here, not resolved.
    for worker in workers:
        worker.current_job_ids = by_host.get(worker.hostname, [])  # type: ignore[attr-defined]
    return workers
