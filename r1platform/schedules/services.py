"""Actions on templates, schedules and their runs (the only code that writes them).

CONTRACT (being filled in): the dashboard and the API call only these functions; the Celery tasks
``r1.run_schedule`` and ``r1.decide_schedule_run`` call ``run_schedule`` and ``decide_run``; the
job runner calls ``job_ended`` for every job that ends.
"""

from __future__ import annotations

from typing import Any

from r1platform.accounts.models import Team
from r1platform.deployments.models import ServingPool
from r1platform.jobs.models import Job
from r1platform.registry.models import RegisteredModel
from r1platform.schedules.models import PipelineTemplate, Schedule, ScheduleRun


class ScheduleRefused(Exception):
    """Bad input for a template or a schedule; the message says what and why. Nothing saved."""


def create_template(
    *, team: Team, user: object, name: str, stages: list[dict], description: str = ""
) -> PipelineTemplate:
    raise NotImplementedError


def update_template(template: PipelineTemplate, **changes: Any) -> PipelineTemplate:
    raise NotImplementedError


def delete_template(template: PipelineTemplate) -> None:
    """Refused (ScheduleRefused) while a schedule uses it."""
    raise NotImplementedError


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
    raise NotImplementedError


def update_schedule(schedule: Schedule, **changes: Any) -> Schedule:
    """Change any field create_schedule takes (enabled=False pauses); the PeriodicTask follows."""
    raise NotImplementedError


def delete_schedule(schedule: Schedule) -> None:
    raise NotImplementedError


def run_schedule(schedule_id: int, trigger: str = "beat") -> ScheduleRun | None:
    """One tick: skip (recorded, with the reason) when the data is unchanged since the last run
    or the last run is still going; else launch the template's job on the newest data."""
    raise NotImplementedError


def job_ended(job: Job) -> None:
    """Called by the runner for every job that ends; for a schedule's job, queue its decision."""
    raise NotImplementedError


def decide_run(run_id: int) -> ScheduleRun:
    """Champion/challenger on the run's evaluation split, then promote, request or keep."""
    raise NotImplementedError
