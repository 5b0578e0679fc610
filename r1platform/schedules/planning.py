"""Planning a run: the stages a schedule's run launches, and the version they start from.

``plan_run`` fills the template in (the training dataset's newest version, a certify stage on the
pool's profile at the team's level) and picks the start version from the champion's lineage.
Saving a schedule plans a run to validate it (``services``); each tick plans the run it launches
(``runs``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.certification.report import level_at_least
from pipelines.core import StageConfigError
from pipelines.stages import validate_pipeline
from r1platform.accounts.models import Team
from r1platform.datasets.models import Dataset
from r1platform.deployments.models import Deployment, ServingPool, Stage
from r1platform.deployments.services import policy_for
from r1platform.jobs.services import LaunchRefused, check_datasets
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import lineage
from r1platform.schedules.checks import ScheduleRefused
from r1platform.schedules.models import Schedule

# Settings a template may leave out that a run fills with the training dataset's newest version.
FILLED_SETTINGS: dict[str, tuple[str, ...]] = {
    "finetune": ("dataset_id",),
    "evaluate": ("dataset_id",),
    # The certificate judges parity (and INT8 retention) on the team's own rows, not random ones.
    "certify": ("golden_dataset_id",),
}
CERTIFY = "certify"


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
    stages = fill_datasets(stages, newest=dataset.pk, training=training)
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


def fill_datasets(stages: list[dict], *, newest: int, training: set[int]) -> list[dict]:
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
