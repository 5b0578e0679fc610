"""Actions on schedules (the only code that writes them).

The dashboard and the API call these to create, edit, pause and delete; each schedule's
django-celery-beat ``PeriodicTask`` is kept in step in the same transaction. A schedule is
validated by planning a run of it (``planning.plan_run``); its runs are launched in ``runs``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask

from r1platform.accounts.models import Team
from r1platform.deployments.models import ServingPool
from r1platform.queues import Queue, TaskName
from r1platform.registry.models import RegisteredModel
from r1platform.schedules.checks import (
    ScheduleRefused,
    check_margin,
    check_split,
    check_timing,
    clean_name,
    creator,
)
from r1platform.schedules.models import PipelineTemplate, Schedule
from r1platform.schedules.planning import newest_dataset, plan_run

log = logging.getLogger(__name__)

RUN_TASK = TaskName.RUN_SCHEDULE.value
PERIODIC_TASK_PREFIX = "r1-schedule-"
SCHEDULE_FIELDS = (
    "name", "model", "template", "dataset_name", "pool", "cron", "interval_seconds", "margin",
    "enabled", "eval_split",
)  # fmt: skip


def create_schedule(
    *,
    team: Team,
    user: object,
    name: str,
    model: RegisteredModel,
    template: PipelineTemplate,
    dataset_name: str,
    pool: ServingPool,
    cron: str = "",
    interval_seconds: int | None = None,
    margin: float = 0.0,
    enabled: bool = True,
    eval_split: str = "test",
) -> Schedule:
    """Validate everything (cron parses, exactly one of cron/interval, the template's stages run on
    the model's newest version with the dataset filled in, the dataset and pool exist, the split
    exists), then save the schedule and its PeriodicTask together."""
    schedule = Schedule(
        team=team,
        name=name,
        model=model,
        template=template,
        dataset_name=dataset_name,
        pool=pool,
        cron=cron or "",
        interval_seconds=interval_seconds,
        margin=margin,
        enabled=bool(enabled),
        eval_split=eval_split,
        created_by=creator(user),
    )
    validate_schedule(schedule)
    try:
        with transaction.atomic():
            schedule.save()
            _sync_periodic_task(schedule)
    except IntegrityError:
        raise ScheduleRefused(f"{team} already has a schedule named {schedule.name!r}") from None
    return schedule


def update_schedule(schedule: Schedule, **changes: Any) -> Schedule:
    """Change any field create_schedule takes (enabled=False pauses); the PeriodicTask follows.

    Setting a cron expression alone switches an interval schedule to cron, and the reverse.
    Everything is validated again; a refusal changes nothing.
    """
    unknown = sorted(set(changes) - set(SCHEDULE_FIELDS))
    if unknown:
        raise ScheduleRefused(
            f"cannot change {', '.join(unknown)}; a schedule has {', '.join(SCHEDULE_FIELDS)}"
        )
    if changes.get("cron") and "interval_seconds" not in changes:
        changes["interval_seconds"] = None
    if changes.get("interval_seconds") is not None and "cron" not in changes:
        changes["cron"] = ""
    if "cron" in changes:
        changes["cron"] = changes["cron"] or ""
    updated = Schedule.objects.get(pk=schedule.pk)
    for field, value in changes.items():
        setattr(updated, field, value)
    validate_schedule(updated)
    updated.updated_at = timezone.now()
    try:
        with transaction.atomic():
            updated.save()
            _sync_periodic_task(updated)
    except IntegrityError:
        raise ScheduleRefused(
            f"{updated.team} already has a schedule named {updated.name!r}"
        ) from None
    for field in [*SCHEDULE_FIELDS, "updated_at", "periodic_task_id"]:
        setattr(schedule, field, getattr(updated, field))
    return schedule


def delete_schedule(schedule: Schedule) -> None:
    """The schedule, its runs and its PeriodicTask go together; jobs and versions stay."""
    with transaction.atomic():
        task_id = schedule.periodic_task_id
        schedule.delete()
        if task_id is not None:
            for task in PeriodicTask.objects.filter(pk=task_id):
                task.delete()  # through the model, so beat is told the schedule changed


def validate_schedule(schedule: Schedule) -> None:
    """Every check of a schedule about to be saved; ScheduleRefused with a clear message."""
    team = schedule.team
    schedule.name = clean_name(schedule.name, "schedule")
    taken = Schedule.objects.filter(team=team, name=schedule.name).exclude(pk=schedule.pk)
    if taken.exists():
        raise ScheduleRefused(f"{team} already has a schedule named {schedule.name!r}")
    if schedule.model.team_id != team.pk:
        raise ScheduleRefused(f"model {schedule.model.name} does not exist in {team}")
    if schedule.template.team_id != team.pk:
        raise ScheduleRefused(f"template {schedule.template.name} does not exist in {team}")
    if schedule.pool is None or not ServingPool.objects.filter(pk=schedule.pool.pk).exists():
        raise ScheduleRefused("the serving pool does not exist; create it first (create_pool)")
    schedule.cron, schedule.interval_seconds = check_timing(
        schedule.cron, schedule.interval_seconds
    )
    schedule.margin = check_margin(schedule.margin)
    schedule.dataset_name = (schedule.dataset_name or "").strip()
    dataset = newest_dataset(team, schedule.dataset_name)
    if dataset is None:
        raise ScheduleRefused(
            f"no dataset named {schedule.dataset_name!r} in {team}; upload it first"
        )
    check_split(schedule.eval_split, dataset)
    plan_run(schedule, dataset)


def _sync_periodic_task(schedule: Schedule) -> PeriodicTask:
    """Make the schedule's PeriodicTask say what the schedule says (caller holds a transaction)."""
    if schedule.cron:
        minute, hour, day_of_month, month_of_year, day_of_week = schedule.cron.split(" ")
        timing = dict(
            minute=minute,
            hour=hour,
            day_of_month=day_of_month,
            month_of_year=month_of_year,
            day_of_week=day_of_week,
            timezone="UTC",
        )
        cron_row = CrontabSchedule.objects.filter(**timing).first()
        kinds: dict[str, Any] = {
            "crontab": cron_row or CrontabSchedule.objects.create(**timing),
            "interval": None,
        }
    else:
        every = {"every": schedule.interval_seconds, "period": IntervalSchedule.SECONDS}
        interval_row = IntervalSchedule.objects.filter(**every).first()
        kinds = {
            "interval": interval_row or IntervalSchedule.objects.create(**every),
            "crontab": None,
        }
    task = schedule.periodic_task or PeriodicTask(name=f"{PERIODIC_TASK_PREFIX}{schedule.pk}")
    task.task = RUN_TASK
    task.args = json.dumps([schedule.pk])
    task.kwargs = "{}"
    task.queue = Queue.CPU.value
    task.enabled = schedule.enabled
    task.one_off = False
    task.description = f"schedule {schedule.name} of team {schedule.team.slug}"
    task.interval, task.crontab = kinds["interval"], kinds["crontab"]
    task.solar = task.clocked = None
    # Beat writes no_changes=True with each run it records; an edit must clear it, or the
    # running beat is never told to reload the schedule.
    task.no_changes = False
    task.save()
    if schedule.periodic_task_id != task.pk:
        schedule.periodic_task = task
        Schedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
    return task
