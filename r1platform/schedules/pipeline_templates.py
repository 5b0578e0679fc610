"""Actions on pipeline templates (the only code that writes them).

The dashboard and the API call these to create, edit and delete a team's templates. A template's
stages are checked on their own here; whether they run on a model is checked per schedule, so a
change to a template used by schedules is validated against each of them.
"""

from __future__ import annotations

import difflib
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone
from pydantic import ValidationError as SettingsError

from pipelines.stages import MAX_STAGES, REGISTRIES
from r1platform.accounts.models import Team
from r1platform.datasets.models import Dataset
from r1platform.schedules.checks import ScheduleRefused, clean_name, creator
from r1platform.schedules.models import PipelineTemplate
from r1platform.schedules.planning import CERTIFY, fill_datasets
from r1platform.schedules.services import validate_schedule


def create_template(
    *, team: Team, user: object, name: str, stages: list[dict], description: str = ""
) -> PipelineTemplate:
    name = clean_name(name, "template")
    stages = check_template_stages(stages, team)
    if PipelineTemplate.objects.filter(team=team, name=name).exists():
        raise ScheduleRefused(f"{team} already has a template named {name!r}")
    try:
        with transaction.atomic():
            return PipelineTemplate.objects.create(
                team=team,
                name=name,
                description=(description or "").strip()[:300],
                stages=stages,
                created_by=creator(user),
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
        changes["name"] = clean_name(changes["name"], "template")
        taken = PipelineTemplate.objects.filter(team_id=template.team_id, name=changes["name"])
        if taken.exclude(pk=template.pk).exists():
            raise ScheduleRefused(
                f"{template.team} already has a template named {changes['name']!r}"
            )
    if "stages" in changes:
        changes["stages"] = check_template_stages(changes["stages"], template.team)
    if "description" in changes:
        changes["description"] = (changes["description"] or "").strip()[:300]
    with transaction.atomic():
        for field, value in changes.items():
            setattr(template, field, value)
        template.updated_at = timezone.now()
        for schedule in template.schedules.select_related("model", "pool__profile", "team"):
            schedule.template = template
            try:
                validate_schedule(schedule)
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


def check_template_stages(stages: Any, team: Team) -> list[dict]:
    """The template's stages as ``[{"name", "settings"}]``, each stage known, its settings
    valid once the run fills the dataset (and the certify profile) in, and each dataset it
    names one of ``team``'s; ScheduleRefused if not.

    Whether the stages fit a model's format is checked per schedule, where the model is known.
    """
    # A template is the model's business only once a schedule names the model: a stage name
    # and settings any model family takes are valid here (a language model's finetune too).
    stage_names = list(dict.fromkeys(n for registry in REGISTRIES.values() for n in registry))
    known = ", ".join(stage_names)
    if not isinstance(stages, list) or not stages:
        raise ScheduleRefused(
            'a template is a non-empty list of stages such as [{"name": "finetune", '
            f'"settings": {{"epochs": 3}}}}]; known stages: {known}'
        )
    if len(stages) > MAX_STAGES:
        raise ScheduleRefused(f"the template has {len(stages)} stages; at most {MAX_STAGES}")
    errors: list[str] = []
    cleaned: list[dict] = []
    numbered: list[tuple[int, dict]] = []  # the valid stages, by their place in the template
    for index, item in enumerate(stages, start=1):
        name = item.get("name") if isinstance(item, dict) else None
        raw = item.get("settings", {}) if isinstance(item, dict) else None
        if not isinstance(name, str) or name not in stage_names:
            close = difflib.get_close_matches(str(name), stage_names, n=1)
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
        trial = fill_datasets([{"name": name, "settings": raw}], newest=1, training=set())[0]
        if name == CERTIFY:
            trial["settings"].setdefault("profile", "any")
        problems = settings_problems(name, trial["settings"])
        if problems:
            errors += [f"stage {index} ({name}): {problem}" for problem in problems]
            continue
        cleaned.append({"name": name, "settings": dict(raw)})
        numbered.append((index, cleaned[-1]))
    errors += foreign_datasets(numbered, team)
    if errors:
        raise ScheduleRefused("\n".join(errors))
    return cleaned


def settings_problems(name: str, settings: dict) -> list[str]:
    """Nothing when some model family's stage ``name`` takes ``settings``; else the problems
    the family with the fewest found (a tensor model's fine-tune and a language model's differ)."""
    found: list[list[str]] = []
    for registry in REGISTRIES.values():
        if name not in registry:
            continue
        try:
            registry[name].Settings.model_validate(settings)
        except SettingsError as exc:
            found.append(
                [
                    f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}"
                    for e in exc.errors()
                ]
            )
            continue
        return []
    return min(found, key=len) if found else [f"unknown stage {name!r}"]


def foreign_datasets(stages: list[tuple[int, dict]], team: Team) -> list[str]:
    """An error for each dataset id the (numbered) stages name that is not one of ``team``'s.

    Another team's id and an id that does not exist get the same answer, so a template cannot
    be used to learn which datasets other teams have.
    """
    named: list[tuple[int, str, str, int]] = []
    for index, stage in stages:
        for key, value in stage["settings"].items():
            if not key.endswith("dataset_id") or value is None or isinstance(value, bool):
                continue
            try:
                named.append((index, stage["name"], key, int(value)))
            except (TypeError, ValueError):
                continue  # not an id: the stage's settings check says so
    ids = {dataset_id for *_, dataset_id in named}
    own = set(Dataset.objects.filter(team=team, pk__in=ids).values_list("pk", flat=True))
    return [
        f"stage {index} ({name}): {key} {dataset_id} is not one of {team}'s datasets; use an id "
        "from its dataset list, or leave it out where the run fills in the training dataset"
        for index, name, key, dataset_id in named
        if dataset_id not in own
    ]
