"""The workers page: the fleet, its state and what each worker runs now (polled by htmx)."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.vary import vary_on_headers

from r1platform.accounts.scoping import teams_for
from r1platform.jobs.models import Job, JobStatus
from r1platform.workers.models import HardwareProfile, Worker
from r1platform.workers.services import worker_state

PAGE = "workers/worker_list.html"


@dataclass(frozen=True)
class CurrentJob:
    pk: int
    visible: bool  # one of the viewer's teams owns it; else it shows as "a job of another team"
    url: str


@dataclass(frozen=True)
class WorkerRow:
    worker: Worker
    state: str
    profiles: list[HardwareProfile]
    jobs: list[CurrentJob]
    beat_seconds: int


def fleet(user: object) -> list[WorkerRow]:
    """Every worker with its state and the running jobs it holds, scoped to ``user``'s teams."""
    workers = list(Worker.objects.prefetch_related("profiles"))
    team_ids = set(teams_for(user).values_list("pk", flat=True))
    running = Job.objects.filter(
        status=JobStatus.RUNNING, worker_host__in=[w.hostname for w in workers]
    ).order_by("pk")
    by_host: dict[str, list[CurrentJob]] = {}
    for job in running.only("pk", "team_id", "worker_host"):
        seen = job.team_id in team_ids
        current = CurrentJob(job.pk, seen, job.get_absolute_url() if seen else "")
        by_host.setdefault(job.worker_host, []).append(current)
    now = timezone.now()
    return [
        WorkerRow(
            worker=w,
            state=worker_state(w),
            profiles=list(w.profiles.all()),
            jobs=by_host.get(w.hostname, []),
            beat_seconds=max(0, int((now - w.last_seen).total_seconds())),
        )
        for w in workers
    ]


@login_required
@vary_on_headers("HX-Request")
def worker_list(request):
    # An htmx poll asks for the table; a history restore after a cache miss needs the page.
    partial = bool(request.htmx) and not request.htmx.history_restore_request
    template = PAGE + "#fleet" if partial else PAGE
    return render(request, template, {"rows": fleet(request.user)})
