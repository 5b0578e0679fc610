"""Actions on templates, schedules and their runs (the only code that writes them).

The dashboard and the API call only these functions; the Celery tasks ``r1.run_schedule`` and
``r1.decide_schedule_run`` call ``run_schedule`` and ``decide_run``; the job runner calls
``job_ended`` for every job that ends.

A run goes: ``run_schedule`` (a beat tick or "run now") launches the template's job on the newest
version of the training dataset, or records why it did not; ``job_ended`` queues the decision on
a worker of the pool's hardware profile; ``decide_run`` scores champion and challenger there and
promotes, requests approval, or keeps the champion, always saying why.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from celery.schedules import crontab
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.urls import NoReverseMatch
from django.utils import timezone
from django_celery_beat import validators
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from pydantic import ValidationError as SettingsError

from gpu_workers.queues import Queue, profile_queue
from pipelines.certification.report import level_at_least
from pipelines.core import PipelineError, StageConfigError
from pipelines.stages import MAX_STAGES, REGISTRY, validate_pipeline
from r1platform.accounts.models import Team
from r1platform.datasets.models import Dataset
from r1platform.deployments.models import Deployment, ServingPool, Stage
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import LaunchRefused, check_datasets, launch_job
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.schedules.models import Decision, PipelineTemplate, Schedule, ScheduleRun

log = logging.getLogger(__name__)

RUN_TASK = "r1.run_schedule"
PERIODIC_TASK_PREFIX = "r1-schedule-"
MIN_INTERVAL_SECONDS = 10
# A beat tick delivered twice (a second beat, a redelivered message) within this share of the
# interval is the same tick; cron schedules fire at most once a minute.
DUPLICATE_TICK_SHARE = 0.5
CRON_DUPLICATE_SECONDS = 30
# A run whose job ended this long ago without a decision lost its decision message: queue it again.
DECISION_LOST_SECONDS = 600
CRON_FIELDS = (
    ("minute", validators.minute_validator),
    ("hour", validators.hour_validator),
    ("day_of_month", validators.day_of_month_validator),
    ("month_of_year", validators.month_of_year_validator),
    ("day_of_week", validators.day_of_week_validator),
)
# Settings a template may leave out that a run fills with the training dataset's newest version.
FILLED_SETTINGS: dict[str, tuple[str, ...]] = {
    "finetune": ("dataset_id",),
    "evaluate": ("dataset_id",),
    # The certificate judges parity (and INT8 retention) on the team's own rows, not random ones.
    "certify": ("golden_dataset_id",),
}
CERTIFY = "certify"
SCHEDULE_FIELDS = (
    "name", "model", "template", "dataset_name", "pool", "cron", "interval_seconds", "margin",
    "enabled", "eval_split",
)  # fmt: skip


class ScheduleRefused(Exception):
    """Bad input for a template or a schedule; the message says what and why. Nothing saved."""


# -- templates -------------------------------------------------------------------------------------


def create_template(
    *, team: Team, user: object, name: str, stages: list[dict], description: str = ""
) -> PipelineTemplate:
    name = _name(name, "template")
    stages = check_template_stages(stages)
    if PipelineTemplate.objects.filter(team=team, name=name).exists():
        raise ScheduleRefused(f"{team} already has a template named {name!r}")
    try:
        with transaction.atomic():
            return PipelineTemplate.objects.create(
                team=team,
                name=name,
                description=(description or "").strip()[:300],
                stages=stages,
                created_by=_user(user),
            )
    except IntegrityError:
        raise ScheduleRefused(f"{team} already has a template named {name!r}") from None


def update_template(template: PipelineTemplate, **changes: Any) -> PipelineTemplate:
    """Change name, description or stages. New stages must still run for every schedule using
    the template (each is validated as at its creation), else nothing changes."""
    unknown = sorted(set(changes) - {"name", "description", "stages"})
    if unknown:
        raise ScheduleRefused(f"cannot change {', '.join(unknown)} of a template")
    if "name" in changes:
        changes["name"] = _name(changes["name"], "template")
        taken = PipelineTemplate.objects.filter(team_id=template.team_id, name=changes["name"])
        if taken.exclude(pk=template.pk).exists():
            raise ScheduleRefused(
                f"{template.team} already has a template named {changes['name']!r}"
            )
    if "stages" in changes:
        changes["stages"] = check_template_stages(changes["stages"])
    if "description" in changes:
        changes["description"] = (changes["description"] or "").strip()[:300]
    with transaction.atomic():
        for field, value in changes.items():
            setattr(template, field, value)
        template.updated_at = timezone.now()
        for schedule in template.schedules.select_related("model", "pool__profile", "team"):
            schedule.template = template
            try:
                _validate(schedule)
            except ScheduleRefused as exc:
                raise ScheduleRefused(f"schedule {schedule.name} could not run it: {exc}") from None
        try:
            template.save()
        except IntegrityError:
            raise ScheduleRefused(
                f"{template.team} already has a template named {template.name!r}"
            ) from None
    return template


def delete_template(template: PipelineTemplate) -> None:
    """Refused (ScheduleRefused) while a schedule uses it."""
    using = list(template.schedules.values_list("name", flat=True))
    if using:
        raise ScheduleRefused(
            f"template {template.name} is used by schedule(s) {', '.join(using)}; delete them or "
            "give them another template first"
        )
    template.delete()


def check_template_stages(stages: Any) -> list[dict]:
    """The template's stages as ``[{"name", "settings"}]``, each stage known and its settings
    valid once the run fills the dataset (and the certify profile) in; ScheduleRefused if not.

    Whether the stages fit a model's format is checked per schedule, where the model is known.
    """
    known = ", ".join(REGISTRY)
    if not isinstance(stages, list) or not stages:
        raise ScheduleRefused(
            'a template is a non-empty list of stages such as [{"name": "finetune", '
            f'"settings": {{"epochs": 3}}}}]; known stages: {known}'
        )
    if len(stages) > MAX_STAGES:
        raise ScheduleRefused(f"the template has {len(stages)} stages; at most {MAX_STAGES}")
    errors: list[str] = []
    cleaned: list[dict] = []
    for index, item in enumerate(stages, start=1):
        name = item.get("name") if isinstance(item, dict) else None
        raw = item.get("settings", {}) if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in REGISTRY:
            close = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"stage {index}: unknown stage {name!r}{hint}; known stages: {known}")
            continue
        extra = sorted(set(item) - {"name", "settings"})
        if extra:
            errors.append(f"stage {index} ({name}): unknown key(s) {', '.join(extra)}")
            continue
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            errors.append(f"stage {index} ({name}): settings must be an object")
            continue
        # Placeholders where the run fills values in: only the other settings are judged here.
        trial = _fill_datasets([{"name": name, "settings": raw}], newest=1, training=set())[0]
        if name == CERTIFY:
            trial["settings"].setdefault("profile", "any")
        try:
            REGISTRY[name].Settings.model_validate(trial["settings"])
        except SettingsError as exc:
            for error in exc.errors():
                field = ".".join(str(part) for part in error["loc"]) or "settings"
                errors.append(f"stage {index} ({name}): {field}: {error['msg']}")
            continue
        cleaned.append({"name": name, "settings": dict(raw)})
    if errors:
        raise ScheduleRefused("\n".join(errors))
    return cleaned


# -- schedules -------------------------------------------------------------------------------------


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
        created_by=_user(user),
    )
    _validate(schedule)
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
    _validate(updated)
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


def _validate(schedule: Schedule) -> None:
    """Every check of a schedule about to be saved; ScheduleRefused with a clear message."""
    team = schedule.team
    schedule.name = _name(schedule.name, "schedule")
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
    schedule.margin = _margin(schedule.margin)
    schedule.dataset_name = (schedule.dataset_name or "").strip()
    dataset = newest_dataset(team, schedule.dataset_name)
    if dataset is None:
        raise ScheduleRefused(
            f"no dataset named {schedule.dataset_name!r} in {team}; upload it first"
        )
    _check_split(schedule.eval_split, dataset)
    plan_run(schedule, dataset)


def check_timing(cron: str, interval_seconds: int | None) -> tuple[str, int | None]:
    """(cron, interval) normalized: exactly one set, the cron five valid fields (UTC), the
    interval a whole number of seconds, at least MIN_INTERVAL_SECONDS."""
    cron = " ".join(str(cron or "").split())
    if cron and interval_seconds is not None:
        raise ScheduleRefused("give either cron or interval_seconds, not both")
    if not cron and interval_seconds is None:
        raise ScheduleRefused(
            'give cron (five fields, UTC, e.g. "0 3 * * *") or interval_seconds (e.g. 86400)'
        )
    if not cron:
        if isinstance(interval_seconds, bool) or not isinstance(interval_seconds, int):
            raise ScheduleRefused(
                f"interval_seconds must be a whole number, got {interval_seconds!r}"
            )
        if interval_seconds < MIN_INTERVAL_SECONDS:
            raise ScheduleRefused(
                f"interval_seconds must be at least {MIN_INTERVAL_SECONDS}, got {interval_seconds}"
            )
        return "", interval_seconds
    fields = cron.split(" ")
    if len(fields) != len(CRON_FIELDS):
        raise ScheduleRefused(
            f"cron {cron!r} has {len(fields)} field(s); it needs five: minute hour day-of-month "
            'month day-of-week (UTC), e.g. "0 3 * * *"'
        )
    for index, ((field, validate), value) in enumerate(zip(CRON_FIELDS, fields, strict=True), 1):
        try:
            validate(value)
            crontab(**{field: value})
        except (ValidationError, ValueError) as exc:
            why = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            why = why.strip('"')
            raise ScheduleRefused(
                f"cron field {index} ({field}) {value!r} does not parse: {why}"
            ) from None
    return cron, None


def _margin(value: Any) -> float:
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise ScheduleRefused(f"margin must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(margin) or margin < 0:
        raise ScheduleRefused(f"margin must be a finite number at least 0, got {value!r}")
    return margin


def _check_split(split: str, dataset: Dataset) -> None:
    splits = [n for n in ("train", "validation", "test") if float(dataset.splits.get(n, 0)) > 0]
    splits.append("all")
    if split not in splits:
        raise ScheduleRefused(
            f"eval_split {split!r} is not a split of {dataset}; its splits: {', '.join(splits)}"
        )


def _name(value: Any, what: str) -> str:
    name = " ".join(str(value or "").split())
    if not name:
        raise ScheduleRefused(f"the {what} needs a name")
    if len(name) > 100:
        raise ScheduleRefused(f"the {what}'s name is longer than 100 characters")
    return name


def _user(user: object) -> Any:
    return user if getattr(user, "is_authenticated", False) else None


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


# -- planning a run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run launches: the template's stages filled in, on the version it starts from."""

    version: ModelVersion
    stages: list[dict]
    champion: ModelVersion | None


def newest_dataset(team: Team | int, name: str) -> Dataset | None:
    team_id = team if isinstance(team, int) else team.pk
    return Dataset.objects.filter(team_id=team_id, name=name).order_by("-version").first()


def champion_of(model: RegisteredModel, pool: ServingPool) -> ModelVersion | None:
    """The version ``pool`` serves in production for ``model`` (None: nothing yet)."""
    deployment = (
        Deployment.objects.select_related("version")
        .filter(model=model, pool=pool, stage=Stage.PRODUCTION)
        .first()
    )
    return deployment.version if deployment else None


def plan_run(schedule: Schedule, dataset: Dataset) -> Plan:
    """The stages a run of ``schedule`` launches on ``dataset``, and the version they start from.

    The start version is the champion's nearest ancestor (the champion itself first) that the
    template can run on: a template beginning with fine-tune needs TorchScript, and the champion
    is usually an INT8 ONNX engine made from a fine-tuned TorchScript version, so the run keeps
    training from the weights that serve today rather than from the original upload. With no
    champion, the model's newest version the template runs on. ScheduleRefused says why when no
    version fits, judged on the champion (or the newest version).
    """
    stages = with_certify(schedule.template.stages, schedule.pool, schedule.team)
    training = set(
        Dataset.objects.filter(team_id=schedule.team_id, name=dataset.name).values_list(
            "pk", flat=True
        )
    )
    stages = _fill_datasets(stages, newest=dataset.pk, training=training)
    champion = champion_of(schedule.model, schedule.pool)
    if champion is not None:
        candidates = list(reversed(_lineage(champion)))
    else:
        candidates = list(schedule.model.versions.order_by("-number"))
    if not candidates:
        raise ScheduleRefused(f"model {schedule.model.name} has no version to start from")
    first_error = ""
    for version in candidates:
        try:
            planned = validate_pipeline(version.format, stages, version.precision)
        except StageConfigError as exc:
            first_error = first_error or str(exc)
            continue
        normalized = [p.to_dict() for p in planned]
        try:
            check_datasets(version, normalized)
        except LaunchRefused as exc:
            raise ScheduleRefused(str(exc)) from None
        return Plan(version, normalized, champion)
    start = candidates[0]
    where = "the production version" if champion is not None else "the newest version"
    raise ScheduleRefused(
        f"the template cannot run on {start} ({where}) or any version it was made from:\n"
        f"{first_error}"
    )


def with_certify(stages: list[dict], pool: ServingPool, team: Team) -> list[dict]:
    """The stages with their certify on the pool's profile at the team's level at least: a
    certify stage is appended when there is none; one naming another profile is refused."""
    from r1platform.deployments.services import policy_for

    profile = pool.profile.key
    level = policy_for(team).required_level
    out = [{"name": s["name"], "settings": dict(s.get("settings") or {})} for s in stages]
    certifies = [s for s in out if s["name"] == CERTIFY]
    for index, stage in enumerate(out, start=1):
        if stage["name"] != CERTIFY:
            continue
        named = stage["settings"].setdefault("profile", profile)
        if named != profile:
            raise ScheduleRefused(
                f"stage {index} (certify) certifies on {named}, but pool {pool.name} serves "
                f"{profile}; leave the profile out (the pool's is used) or pick a pool on {named}"
            )
        asked = stage["settings"].setdefault("level", level)
        known = asked in ("basic", "performance", "scenario")
        if known and not level_at_least(asked, level):
            raise ScheduleRefused(
                f"stage {index} (certify) certifies at {asked}, below the {level} level "
                f"{team} requires to promote; raise it or leave it out"
            )
    if not certifies:
        out.append({"name": CERTIFY, "settings": {"profile": profile, "level": level}})
    return out


def _fill_datasets(stages: list[dict], *, newest: int, training: set[int]) -> list[dict]:
    """Dataset settings the template leaves out, or that name any version of the training
    dataset, become ``newest``; a setting naming another dataset is kept."""
    out = []
    for stage in stages:
        name = stage["name"]
        values = dict(stage.get("settings") or {})
        fillable = FILLED_SETTINGS.get(name, ())
        if name == "quantize" and values.get("mode") == "int8_static":
            fillable = ("calibration_dataset_id",)
        for key in fillable:
            if values.get(key) is None:
                values[key] = newest
        for key, value in values.items():
            if key.endswith("dataset_id") and type(value) is int and value in training:
                values[key] = newest
        out.append({"name": name, "settings": values})
    return out


def _lineage(version: ModelVersion) -> list[ModelVersion]:
    from r1platform.registry.services import lineage

    return lineage(version)


# -- runs ------------------------------------------------------------------------------------------


def run_schedule(schedule_id: int, trigger: str = "beat") -> ScheduleRun | None:
    """One tick: skip (recorded, with the reason) when the data is unchanged since the last run
    or the last run is still going; else launch the template's job on the newest data.

    ``trigger`` is "beat" (the PeriodicTask) or "manual" ("run now": it runs a paused schedule and
    unchanged data too). None when nothing is recorded: the schedule is gone, a beat tick of a
    paused schedule, or a duplicate of a tick already taken.
    """
    with transaction.atomic():
        # The row lock makes two deliveries of a tick take turns (select_for_update on
        # PostgreSQL; SQLite's IMMEDIATE transactions already serialize writers).
        schedule = (
            Schedule.objects.select_for_update()
            .select_related("team", "model", "template", "pool__profile")
            .filter(pk=schedule_id)
            .first()
        )
        if schedule is None:
            log.info("schedule %s is gone; tick ignored", schedule_id)
            return None
        if trigger == "beat" and not schedule.enabled:
            log.info("schedule %s is paused; tick ignored", schedule_id)
            return None
        if trigger == "beat" and _duplicate_tick(schedule):
            log.info("schedule %s: a tick was taken moments ago; duplicate ignored", schedule_id)
            return None
        run = _tick(schedule, trigger)
    if run.decision == Decision.FAILED:
        _notify(run)
    return run


def _duplicate_tick(schedule: Schedule) -> bool:
    if schedule.interval_seconds:
        window = schedule.interval_seconds * DUPLICATE_TICK_SHARE
    else:
        window = CRON_DUPLICATE_SECONDS
    since = timezone.now() - timedelta(seconds=window)
    return schedule.runs.filter(trigger="beat", created_at__gt=since).exists()


def _tick(schedule: Schedule, trigger: str) -> ScheduleRun:
    going = schedule.runs.filter(decision=Decision.RUNNING).select_related("job").first()
    busy = _still_going(going) if going is not None else None
    if busy is not None:
        return _record(schedule, trigger, Decision.SKIPPED, busy)
    dataset = newest_dataset(schedule.team_id, schedule.dataset_name)
    if dataset is None:
        why = f"no dataset named {schedule.dataset_name!r} in {schedule.team}; upload it"
        return _record(schedule, trigger, Decision.FAILED, why)
    last = schedule.runs.filter(job__isnull=False, dataset__isnull=False).first()
    if trigger != "manual" and last is not None and last.dataset_id == dataset.pk:
        why = f"the data has not changed since run {last.pk} ({dataset})"
        return _record(schedule, trigger, Decision.SKIPPED, why, dataset=dataset)
    try:
        plan = plan_run(schedule, dataset)
    except ScheduleRefused as exc:
        return _record(schedule, trigger, Decision.FAILED, str(exc), dataset=dataset)
    run = _record(schedule, trigger, Decision.RUNNING, "", dataset=dataset)
    try:
        job, _ = launch_job(
            version=plan.version,
            user=None,
            stages=plan.stages,
            idempotency_key=f"schedule-{schedule.pk}-run-{run.pk}",
        )
    except LaunchRefused as exc:
        run.decision, run.reason, run.decided_at = Decision.FAILED, str(exc), timezone.now()
        run.save(update_fields=["decision", "reason", "decided_at"])
        return run
    run.job = job
    run.reason = f"job {job.pk} on {plan.version} with {dataset}"
    run.save(update_fields=["job", "reason"])
    log.info("schedule %s: run %s launched job %s", schedule.pk, run.pk, job.pk)
    return run


def _still_going(run: ScheduleRun) -> str | None:
    """Why ``run`` still blocks the next one, or None once it is settled here.

    A job can end without the runner (cancelled while queued, failed as poison by the reaper):
    its run is failed now instead of blocking the schedule for ever.
    """
    job = run.job
    if job is None:
        _conclude(run, Decision.FAILED, "its job was deleted before it was decided")
        return None
    if not job.is_finished:
        return f"run {run.pk} (job {job.pk}) is still going"
    if job.status != JobStatus.SUCCEEDED:
        job_ended(job)
        return None
    waited = (timezone.now() - (job.finished_at or timezone.now())).total_seconds()
    if waited > DECISION_LOST_SECONDS:
        # The decision message was lost (no worker of the profile took it): ask again.
        transaction.on_commit(lambda: _queue_decision(run))
        return f"run {run.pk} (job {job.pk}) still waits for its decision; asked again"
    return f"run {run.pk} (job {job.pk}) is still being decided"


def _record(
    schedule: Schedule, trigger: str, decision: str, reason: str, dataset: Dataset | None = None
) -> ScheduleRun:
    now = timezone.now()
    return ScheduleRun.objects.create(
        schedule=schedule,
        team_id=schedule.team_id,
        trigger=trigger,
        dataset=dataset,
        decision=decision,
        reason=reason,
        created_at=now,
        decided_at=None if decision == Decision.RUNNING else now,
    )


def job_ended(job: Job) -> None:
    """Called by the runner for every job that ends; for a schedule's job, queue its decision.

    A failed or cancelled job fails its run (and notifies). A succeeded one is decided on a worker
    of the pool's profile: scoring runs the engines on the hardware they will serve on.
    """
    run = (
        ScheduleRun.objects.filter(job=job, decision=Decision.RUNNING)
        .select_related("schedule__pool__profile", "schedule__model", "schedule__team", "job")
        .first()
    )
    if run is None:
        return
    if job.status != JobStatus.SUCCEEDED:
        why = job.error or ("cancelled" if job.status == JobStatus.CANCELLED else job.status)
        if _conclude(run, Decision.FAILED, f"job {job.pk} {job.status}: {why}"):
            _notify(run)
        return
    transaction.on_commit(lambda: _queue_decision(run))


def _queue_decision(run: ScheduleRun) -> None:
    from gpu_workers.tasks import decide_schedule_run

    queue = profile_queue(run.schedule.pool.profile.key)
    decide_schedule_run.apply_async(args=[run.pk], queue=queue)


def _conclude(run: ScheduleRun, decision: str, reason: str, **fields: Any) -> bool:
    """Record the decision if the run is still undecided; whether this call recorded it."""
    now = timezone.now()
    values = {"decision": decision, "reason": reason, "decided_at": now, **fields}
    done = ScheduleRun.objects.filter(pk=run.pk, decision=Decision.RUNNING).update(**values)
    for field, value in values.items():
        setattr(run, field, value)
    return done == 1


# -- deciding --------------------------------------------------------------------------------------


@dataclass
class _Verdict:
    decision: str
    reason: str
    fields: dict[str, Any]


def decide_run(run_id: int) -> ScheduleRun:
    """Champion/challenger on the run's evaluation split, then promote, request or keep.

    Scoring runs outside any transaction (it takes seconds); then, with the run's row locked and
    still undecided, the promotion (through the gate) and the decision are written together, so
    a decision delivered twice promotes once.
    """
    run = ScheduleRun.objects.select_related(
        "schedule__pool__profile", "schedule__model", "schedule__team", "job", "dataset"
    ).get(pk=run_id)
    if run.decision != Decision.RUNNING:
        return run
    try:
        verdict = _judge(run)
    except Exception as exc:  # noqa: BLE001 - whatever happened is the run's recorded reason
        log.exception("schedule run %s: deciding failed", run.pk)
        why = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
        verdict = _Verdict(Decision.FAILED, f"the decision could not be made: {why}", {})
    try:
        recorded = _apply(run, verdict)
    except Exception as exc:  # noqa: BLE001 - a gate error is recorded, not retried forever
        log.exception("schedule run %s: promoting failed", run.pk)
        verdict = _Verdict(
            Decision.FAILED, f"the promotion failed: {type(exc).__name__}: {exc}", {}
        )
        recorded = _conclude(run, verdict.decision, verdict.reason, **verdict.fields)
    run.refresh_from_db()
    if recorded and run.decision in (Decision.PROMOTED, Decision.REQUESTED, Decision.FAILED):
        _notify(run)
    return run


def _judge(run: ScheduleRun) -> _Verdict:
    """What the run should decide, before anything is written: challenger, champion, scores."""
    from pipelines.challenge import challenge
    from r1platform.certification.models import Certification
    from r1platform.certification.services import validity
    from r1platform.datasets.services import dataset_ref
    from r1platform.registry.services import version_artifact

    schedule = run.schedule
    profile = schedule.pool.profile
    cert = (
        Certification.objects.filter(job_id=run.job_id, profile=profile)
        .select_related("version", "profile")
        .order_by("-pk")
        .first()
    )
    if cert is None:
        return _Verdict(Decision.FAILED, f"job {run.job_id} certified nothing on {profile.key}", {})
    challenger = cert.version
    fields: dict[str, Any] = {"challenger": challenger}
    checked = validity(cert)
    if not checked.valid:
        reasons = "; ".join(checked.reasons)
        why = f"challenger v{challenger.number}'s certificate {checked.state} ({reasons})"
        return _Verdict(Decision.KEPT, why, fields)
    champion = champion_of(schedule.model, schedule.pool)
    fields["champion"] = champion
    if champion is None:
        return _Verdict(Decision.PROMOTED, "no production version yet", fields)
    if champion.pk == challenger.pk:
        return _Verdict(Decision.KEPT, f"v{challenger.number} already serves in production", fields)
    if run.dataset is None:
        return _Verdict(Decision.FAILED, "the run's dataset was deleted; cannot score", fields)
    result = challenge(
        version_artifact(champion, f"champion-v{champion.number}"),
        version_artifact(challenger, f"challenger-v{challenger.number}"),
        dataset_ref(run.dataset),
        schedule.eval_split,
        schedule.model.task,
    )
    fields.update(
        metric=result.metric,
        champion_score=result.champion,
        challenger_score=result.challenger,
    )
    why = (
        f"challenger {result.challenger:.4g} vs champion {result.champion:.4g} "
        f"({result.metric} on {run.dataset} {result.split}, margin {schedule.margin:g})"
    )
    if result.margin_won(schedule.margin):
        return _Verdict(Decision.PROMOTED, why, fields)
    return _Verdict(Decision.KEPT, why, fields)


def _apply(run: ScheduleRun, verdict: _Verdict) -> bool:
    """Promote (when the verdict says so) and record the decision, with the run's row locked."""
    from r1platform.deployments.services import promote

    schedule = run.schedule
    with transaction.atomic():
        locked = ScheduleRun.objects.select_for_update().filter(pk=run.pk).first()
        if locked is None or locked.decision != Decision.RUNNING:
            return False
        decision, reason = verdict.decision, verdict.reason
        if decision == Decision.PROMOTED:
            outcome = promote(
                model=schedule.model,
                version=verdict.fields["challenger"],
                pool=schedule.pool,
                stage=Stage.PRODUCTION,
                actor=None,
                actor_label=f"schedule {schedule.name}",
                reason=f"scheduled run {run.pk}: {reason}",
            )
            if outcome.status == "pending":
                decision, reason = Decision.REQUESTED, f"{reason}; {outcome.reason}"
            elif outcome.status != "promoted":
                decision, reason = Decision.KEPT, f"the gate refused: {outcome.reason}"
        return _conclude(run, decision, reason, **verdict.fields)


# -- notifications ---------------------------------------------------------------------------------


def run_url(run: ScheduleRun) -> str:
    try:
        path = run.schedule.get_absolute_url()
    except NoReverseMatch:
        path = f"/schedules/{run.schedule_id}/"
    return settings.R1_PUBLIC_URL + path


def notification_payload(run: ScheduleRun) -> dict[str, Any]:
    """What a webhook receives about a run: plain JSON, every version by number."""
    schedule = run.schedule
    return {
        "schedule": {"id": schedule.pk, "name": schedule.name},
        "run_id": run.pk,
        "model": schedule.model.name,
        "pool": schedule.pool.name,
        "decision": run.decision,
        "reason": run.reason,
        "champion_version": run.champion.number if run.champion else None,
        "challenger_version": run.challenger.number if run.challenger else None,
        "metric": run.metric or None,
        "champion_score": run.champion_score,
        "challenger_score": run.challenger_score,
        "job_id": run.job_id,
        "dataset": str(run.dataset) if run.dataset else None,
        "url": run_url(run),
    }


def _notify(run: ScheduleRun) -> None:
    """Tell the team; a notification that cannot be sent is logged and changes no decision."""
    from r1platform.notifications import services as notifications

    events = {
        Decision.FAILED: notifications.SCHEDULE_RUN_FAILED,
        Decision.PROMOTED: notifications.SCHEDULE_RUN_PROMOTED,
        Decision.REQUESTED: notifications.SCHEDULE_RUN_REQUESTED,
    }
    event = events.get(run.decision)
    if event is None:
        return
    try:
        notifications.notify(run.schedule.team, event, notification_payload(run))
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("schedule run %s: could not notify %s", run.pk, event)
