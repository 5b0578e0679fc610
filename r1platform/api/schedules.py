"""Pipeline templates and the schedules that run them: ``/api/v1/schedules`` and
``/api/v1/templates``.

Same rules as every router mounted by ``api.py``: a team token, the team's objects only, another
team's id answers 404. Every write is one call to ``schedules.services`` (schedules) or
``schedules.pipeline_templates`` (templates); a refusal (a cron expression that does not parse,
an unknown stage, cron and interval both given) answers 400 with the service's message.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.http import HttpRequest
from ninja import Router, Schema, Status

from r1platform.accounts.scoping import get_scoped_or_404
from r1platform.api.auth import team_id
from r1platform.api.schemas import ErrorOut, StageIn, page_limit
from r1platform.deployments.models import ServingPool
from r1platform.registry.models import RegisteredModel
from r1platform.schedules import pipeline_templates, runs, services
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.models import PipelineTemplate, Schedule, ScheduleRun
from r1platform.schedules.tables import (
    free_name,
    next_run_at,
    runs_of,
    schedules_with_last_run,
    template_in_use_elsewhere,
)

router = Router(tags=["schedules"])

Errors = {400: ErrorOut, 404: ErrorOut, 409: ErrorOut}


# -- schemas ---------------------------------------------------------------------------------------


class TemplateIn(Schema):
    name: str
    stages: list[StageIn]
    description: str = ""


class TemplatePatch(Schema):
    name: str | None = None
    stages: list[StageIn] | None = None
    description: str | None = None


class TemplateOut(Schema):
    id: int
    name: str
    description: str
    stages: list[StageIn]
    stage_names: list[str]
    schedule_ids: list[int]
    created_at: datetime
    updated_at: datetime

    @staticmethod
    def resolve_schedule_ids(template: PipelineTemplate) -> list[int]:
        return sorted(template.schedules.values_list("pk", flat=True))


class ScheduleIn(Schema):
    model_id: int
    # Either the stages (a template named after the schedule is made) or an existing template.
    template: list[StageIn] | None = None
    template_id: int | None = None
    dataset: str
    pool: str
    cron: str = ""
    interval_seconds: int | None = None
    margin: float = 0.0
    enabled: bool = True
    name: str = ""
    eval_split: str = "test"


class SchedulePatch(Schema):
    model_id: int | None = None
    template: list[StageIn] | None = None
    template_id: int | None = None
    dataset: str | None = None
    pool: str | None = None
    cron: str | None = None
    interval_seconds: int | None = None
    margin: float | None = None
    enabled: bool | None = None
    name: str | None = None
    eval_split: str | None = None


class RunOut(Schema):
    id: int
    schedule_id: int
    trigger: str
    decision: str
    reason: str
    job_id: int | None
    job_status: str | None
    dataset_id: int | None
    dataset_name: str | None
    dataset_version: int | None
    champion_id: int | None
    champion_number: int | None
    challenger_id: int | None
    challenger_number: int | None
    metric: str
    champion_score: float | None
    challenger_score: float | None
    created_at: datetime
    decided_at: datetime | None

    # A run's job, dataset, champion and challenger may be gone (deleted) or never set.
    @staticmethod
    def resolve_job_status(run: ScheduleRun) -> str | None:
        return run.job.status if run.job else None

    @staticmethod
    def resolve_dataset_name(run: ScheduleRun) -> str | None:
        return run.dataset.name if run.dataset else None

    @staticmethod
    def resolve_dataset_version(run: ScheduleRun) -> int | None:
        return run.dataset.version if run.dataset else None

    @staticmethod
    def resolve_champion_number(run: ScheduleRun) -> int | None:
        return run.champion.number if run.champion else None

    @staticmethod
    def resolve_challenger_number(run: ScheduleRun) -> int | None:
        return run.challenger.number if run.challenger else None


class LastRunOut(Schema):
    decision: str
    created_at: datetime


class ScheduleOut(Schema):
    id: int
    name: str
    model_id: int
    model_name: str
    template: TemplateOut
    dataset: str
    eval_split: str
    pool: str
    cron: str
    interval_seconds: int | None
    timing: str
    margin: float
    enabled: bool
    next_run_at: datetime | None
    last_run: LastRunOut | None
    created_at: datetime
    updated_at: datetime

    # A schedule as read by ``schedules_with_last_run``, which annotates its last run.
    @staticmethod
    def resolve_model_name(sch: Schedule) -> str:
        return sch.model.name

    @staticmethod
    def resolve_dataset(sch: Schedule) -> str:
        return sch.dataset_name

    @staticmethod
    def resolve_pool(sch: Schedule) -> str:
        return sch.pool.name

    @staticmethod
    def resolve_next_run_at(sch: Schedule) -> datetime | None:
        return next_run_at(sch)

    @staticmethod
    def resolve_last_run(sch: Schedule) -> dict[str, Any] | None:
        if not sch.last_decision:  # type: ignore[attr-defined]
            return None
        return {"decision": sch.last_decision, "created_at": sch.last_run_at}  # type: ignore[attr-defined]


# -- helpers ---------------------------------------------------------------------------------------


def _fresh(sch: Schedule) -> Schedule:
    """The schedule read again with its last run, so an answer after a write shows what a GET
    shows."""
    return schedules_with_last_run(Schedule.objects.filter(pk=sch.pk)).get()


def _stages(stages: list[StageIn]) -> list[dict]:
    return [st.dict() for st in stages]


def _get_schedule(request: HttpRequest, schedule_id: int) -> Schedule:
    qs = schedules_with_last_run(Schedule.objects.all())
    return get_scoped_or_404(qs, [team_id(request)], pk=schedule_id)


def _get_template(request: HttpRequest, template_id: int) -> PipelineTemplate:
    return get_scoped_or_404(PipelineTemplate.objects.all(), [team_id(request)], pk=template_id)


class _BadInput(Exception):
    """Input refused before any service is called (a pool that does not exist, ...)."""


def _pool(name: str) -> ServingPool:
    pool = ServingPool.objects.filter(name=name).first()
    if pool is None:
        known = ", ".join(ServingPool.objects.values_list("name", flat=True)) or "none"
        raise _BadInput(f"no serving pool named {name!r}; pools: {known}")
    return pool


def _new_template(request: HttpRequest, name: str, stages: list[StageIn]) -> PipelineTemplate:
    """A template for one schedule's stages, named after the schedule (made unique)."""
    team = request.auth.team  # type: ignore[attr-defined]
    return pipeline_templates.create_template(
        team=team,
        user=request.user,
        name=free_name(PipelineTemplate.objects.filter(team=team), name),
        stages=_stages(stages),
    )


# -- schedules -------------------------------------------------------------------------------------


@router.post("/schedules", response={201: ScheduleOut, **Errors})
def create_schedule(request: HttpRequest, payload: ScheduleIn):
    """Run a template on a model on a cron expression (UTC) or every ``interval_seconds``, then
    champion/challenger in ``pool``. ``template`` (stages, as in POST /jobs) makes a template
    named after the schedule; ``template_id`` uses an existing one."""
    team = request.auth.team  # type: ignore[attr-defined]
    model = get_scoped_or_404(RegisteredModel.objects.all(), [team.pk], pk=payload.model_id)
    if (payload.template is None) == (payload.template_id is None):
        return Status(400, {"detail": "give either template (a list of stages) or template_id"})
    existing = None
    if payload.template_id is not None:
        existing = _get_template(request, payload.template_id)
    name = payload.name.strip() or free_name(
        Schedule.objects.filter(team=team), f"{model.name} retraining"
    )
    try:
        # One transaction: a schedule refused after its template was made leaves no template.
        with transaction.atomic():
            template = existing or _new_template(request, name, payload.template or [])
            schedule = services.create_schedule(
                team=team,
                user=request.user,
                name=name,
                model=model,
                template=template,
                dataset_name=payload.dataset,
                pool=_pool(payload.pool),
                cron=payload.cron.strip(),
                interval_seconds=payload.interval_seconds,
                margin=payload.margin,
                enabled=payload.enabled,
                eval_split=payload.eval_split,
            )
    except (ScheduleRefused, _BadInput) as exc:
        return Status(400, {"detail": str(exc)})
    return Status(201, _fresh(schedule))


@router.get("/schedules", response=list[ScheduleOut])
def list_schedules(request: HttpRequest, model_id: int | None = None):
    found = schedules_with_last_run(Schedule.objects.filter(team_id=team_id(request)))
    if model_id is not None:
        found = found.filter(model_id=model_id)
    return found.order_by("name")


@router.get("/schedules/{schedule_id}", response={200: ScheduleOut, 404: ErrorOut})
def get_schedule(request: HttpRequest, schedule_id: int):
    """The schedule's settings, its template's stages, its next tick and its last decision."""
    return _get_schedule(request, schedule_id)


def _schedule_changes(request: HttpRequest, schedule: Schedule, given: dict[str, Any]) -> dict:
    """The PATCH body as ``update_schedule`` keywords (ids and names turned into rows)."""
    changes: dict[str, Any] = {}
    for field in ("name", "margin", "enabled", "eval_split"):
        if given.get(field) is not None:
            changes[field] = given[field]
    if "model_id" in given:
        changes["model"] = get_scoped_or_404(
            RegisteredModel.objects.all(), [team_id(request)], pk=given["model_id"]
        )
    if given.get("dataset") is not None:
        changes["dataset_name"] = given["dataset"]
    if given.get("pool") is not None:
        changes["pool"] = _pool(given["pool"])
    # The service lets one timing replace the other, and refuses both at once.
    if "cron" in given:
        changes["cron"] = (given["cron"] or "").strip()
    if "interval_seconds" in given:
        changes["interval_seconds"] = given["interval_seconds"]
    return changes


@router.patch("/schedules/{schedule_id}", response={200: ScheduleOut, **Errors})
def update_schedule(request: HttpRequest, schedule_id: int, payload: SchedulePatch):
    """Change any field; ``enabled: false`` pauses the schedule, ``true`` resumes it.

    ``template`` (stages) rewrites the schedule's template when no other schedule uses it, else
    gives the schedule a template of its own; ``template_id`` switches to another template.
    """
    schedule = _get_schedule(request, schedule_id)
    given = payload.dict(exclude_unset=True)
    if given.get("template") is not None and given.get("template_id") is not None:
        return Status(400, {"detail": "give either template (a list of stages) or template_id"})
    try:
        with transaction.atomic():
            changes = _schedule_changes(request, schedule, given)
            if given.get("template_id") is not None:
                changes["template"] = _get_template(request, given["template_id"])
            elif payload.template is not None:
                if template_in_use_elsewhere(schedule.template, schedule):
                    name = changes.get("name", schedule.name)
                    changes["template"] = _new_template(request, name, payload.template)
                else:
                    pipeline_templates.update_template(
                        schedule.template, stages=_stages(payload.template)
                    )
            schedule = services.update_schedule(schedule, **changes)
    except (ScheduleRefused, _BadInput) as exc:
        return Status(400, {"detail": str(exc)})
    return _fresh(schedule)


@router.delete("/schedules/{schedule_id}", response={204: None, 404: ErrorOut})
def delete_schedule(request: HttpRequest, schedule_id: int):
    """Delete the schedule, its beat entry and its runs (the jobs and versions stay)."""
    services.delete_schedule(_get_schedule(request, schedule_id))
    return Status(204, None)


@router.get("/schedules/{schedule_id}/runs", response={200: list[RunOut], 404: ErrorOut})
def list_runs(request: HttpRequest, schedule_id: int, limit: int = 50, offset: int = 0):
    """Each run, newest first: its job, the dataset version it trained on, champion against
    challenger with both scores, and the decision with its reason."""
    schedule = _get_schedule(request, schedule_id)
    return runs_of(schedule)[offset : offset + page_limit(limit)]


@router.post("/schedules/{schedule_id}/run", response={200: RunOut, 201: RunOut, **Errors})
def run_now(request: HttpRequest, schedule_id: int):
    """Run the schedule now (paused or not): 201 with the run when it launched a job, 200 with
    the run recorded as skipped or failed (and its reason) when it launched none."""
    schedule = _get_schedule(request, schedule_id)
    try:
        run = runs.run_schedule(schedule.pk, trigger="manual")
    except ScheduleRefused as exc:
        return Status(400, {"detail": str(exc)})
    if run is None:
        return Status(409, {"detail": f"schedule {schedule.pk} did not run"})
    run = runs_of(schedule).get(pk=run.pk)
    return Status(201 if run.job_id else 200, run)


# -- templates -------------------------------------------------------------------------------------


@router.post("/templates", response={201: TemplateOut, **Errors})
def create_template(request: HttpRequest, payload: TemplateIn):
    """A reusable list of stages (as in POST /jobs); dataset ids may be left out: a schedule fills
    them with its training dataset's newest version at each run."""
    try:
        template = pipeline_templates.create_template(
            team=request.auth.team,  # type: ignore[attr-defined]
            user=request.user,
            name=payload.name,
            stages=_stages(payload.stages),
            description=payload.description,
        )
    except ScheduleRefused as exc:
        return Status(400, {"detail": str(exc)})
    return Status(201, template)


@router.get("/templates", response=list[TemplateOut])
def list_templates(request: HttpRequest):
    found = PipelineTemplate.objects.filter(team_id=team_id(request)).order_by("name")
    return found


@router.get("/templates/{template_id}", response={200: TemplateOut, 404: ErrorOut})
def get_template(request: HttpRequest, template_id: int):
    return _get_template(request, template_id)


@router.patch("/templates/{template_id}", response={200: TemplateOut, **Errors})
def update_template(request: HttpRequest, template_id: int, payload: TemplatePatch):
    """Change the name, description or stages; every schedule using it runs the new stages."""
    template = _get_template(request, template_id)
    changes = {k: v for k, v in payload.dict(exclude_unset=True).items() if v is not None}
    if "stages" in changes:
        changes["stages"] = _stages(payload.stages or [])
    try:
        template = pipeline_templates.update_template(template, **changes)
    except ScheduleRefused as exc:
        return Status(400, {"detail": str(exc)})
    return template


@router.delete("/templates/{template_id}", response={204: None, 404: ErrorOut, 409: ErrorOut})
def delete_template(request: HttpRequest, template_id: int):
    """Delete a template; 409 while a schedule uses it."""
    try:
        pipeline_templates.delete_template(_get_template(request, template_id))
    except ScheduleRefused as exc:
        return Status(409, {"detail": str(exc)})
    return Status(204, None)
