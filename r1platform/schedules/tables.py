"""What the schedules pages and the API read: schedules with their last run, the next tick, the
runs of a schedule, and the free name a new schedule or template gets. Reads only: every write
goes through ``schedules.services``."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import OuterRef, QuerySet, Subquery
from django.utils import timezone

from r1platform.schedules.models import DECIDED, PipelineTemplate, Schedule, ScheduleRun


def schedules_with_last_run(queryset: QuerySet[Schedule]) -> QuerySet[Schedule]:
    """``queryset`` with ``last_decision`` and ``last_run_at`` of each schedule's newest run, in
    one query, so a list of schedules never asks once per row."""
    newest = ScheduleRun.objects.filter(schedule=OuterRef("pk")).order_by("-created_at", "-pk")
    return queryset.select_related(
        "model", "template", "pool__profile", "periodic_task", "team"
    ).annotate(
        last_decision=Subquery(newest.values("decision")[:1]),
        last_run_at=Subquery(newest.values("created_at")[:1]),
    )


def runs_of(schedule: Schedule) -> QuerySet[ScheduleRun]:
    return schedule.runs.select_related("job", "dataset", "champion", "challenger")


def has_undecided_run(schedule: Schedule) -> bool:
    return schedule.runs.exclude(decision__in=DECIDED).exists()


def next_run_at(schedule: Schedule) -> datetime | None:
    """When beat will next send the schedule, estimated from its PeriodicTask; None when paused.

    Beat counts from the task's last run; a task that never ran counts from when it last
    changed (close to when beat picks it up). A time already past means "due now".
    """
    task = schedule.periodic_task
    if task is None or not task.enabled or not schedule.enabled:
        return None
    now = timezone.now()
    last = task.last_run_at or task.date_changed or now
    estimate = max(now, now + task.schedule.remaining_estimate(last))
    # The estimate counts from the schedule's own "now", a moment later than ours: round it.
    return (estimate + timedelta(microseconds=500_000)).replace(microsecond=0)


def free_name(queryset: QuerySet, base: str, max_length: int = 100) -> str:
    """``base``, or ``base 2``, ``base 3``... : the first name no row of ``queryset`` has."""
    base = base[:max_length].strip()
    taken = set(queryset.filter(name__startswith=base).values_list("name", flat=True))
    name, n = base, 1
    while name in taken:
        n += 1
        suffix = f" {n}"
        name = base[: max_length - len(suffix)] + suffix
    return name


def template_in_use_elsewhere(template: PipelineTemplate, schedule: Schedule) -> bool:
    return template.schedules.exclude(pk=schedule.pk).exists()
