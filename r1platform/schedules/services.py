"""Actions on pipeline templates and schedules (the only code that writes them), and run planning.

The dashboard and the API call these to create, edit, pause and delete; each schedule's
django-celery-beat ``PeriodicTask`` is kept in step in the same transaction. ``plan_run`` says
what a run would launch; it validates a schedule here and launches its runs in ``runs``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from celery.schedules import crontab
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from django_celery_beat import validators
from django_celery_beat.models import CrontabSchedule, IntervalSchedule, PeriodicTask
from pydantic import ValidationError as SettingsError

from pipelines.certification.report import level_at_least
from pipelines.core import StageConfigError
from pipelines.stages import MAX_STAGES, REGISTRY, validate_pipeline
from r1platform.accounts.models import Team
from r1platform.datasets.models import Dataset
from r1platform.deployments.models import Deployment, ServingPool, Stage
from r1platform.deployments.services import policy_for
from r1platform.jobs.services import LaunchRefused, check_datasets
from r1platform.queues import Queue, TaskName
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import lineage
from r1platform.schedules.models import PipelineTemplate, Schedule

log = logging.getLogger(__name__)

RUN_TASK = TaskName.RUN_SCHEDULE.value
PERIODIC_TASK_PREFIX = "r1-schedule-"
MIN_INTERVAL_SECONDS = 10
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
        candidates = list(reversed(lineage(champion)))
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
