"""Certification: launch the suite on a version for a profile, record its verdict, and answer
"is version V certified at level L for profile P?".

Every refusal happens before anything is queued. The report a worker hands back is recorded by
``recording`` (above this module and ``reports``, which render what this one describes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from django.db import transaction
from django.utils import timezone
from pydantic import ValidationError

from pipelines.certification.profiles import HardwareProfile as Profile
from pipelines.certification.profiles import compatibility_problem
from pipelines.certification.report import Level, SuiteReport, level_at_least
from pipelines.certification.settings import TEXT_GOLDEN_KINDS, CertifySettings
from pipelines.datasets import TARGET_NAMES, default_target
from pipelines.llm.kinds import is_text_format
from r1platform.certification.document import (
    CertificateDocument,
    DatasetRef,
    LineageEntry,
    ModelRef,
    ProfileRef,
    ValidityRef,
    VersionRef,
)
from r1platform.certification.models import Certification, CertStatus, CriteriaPolicy
from r1platform.core import storage
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import TEST_CASES_SETTING, LaunchRefused, launch_job
from r1platform.registry import services as registry
from r1platform.registry.models import ModelVersion
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import live_profiles, serving_problem

CERTIFY_STAGE = "certify"
# Settings launch_certification takes as arguments of their own; every other one is a threshold.
LAUNCH_SETTINGS = ("profile", "level", "golden_dataset_id")
# The threshold that names the scenario's test-case dataset (checked by launch_job).
TEST_CASES = TEST_CASES_SETTING
THRESHOLDS = tuple(name for name in CertifySettings.model_fields if name not in LAUNCH_SETTINGS)
REPORT_KINDS = ("json", "html", "pdf")

State = Literal["valid", "invalid", "failed", "pending", "error"]


class CertificationRefused(LaunchRefused):
    """The certification cannot run as asked; nothing was queued."""


@dataclass(frozen=True)
class Validity:
    valid: bool
    reasons: list[str]
    state: State


class Everywhere(NamedTuple):
    """What ``launch_everywhere`` did: the certifications queued, and each live profile skipped
    with the reason, as (profile key, reason)."""

    launched: list[Certification]
    skipped: list[tuple[str, str]]


@dataclass(frozen=True)
class CertAnswer:
    certified: bool
    certification: Certification | None
    reason: str


# -- launch ----------------------------------------------------------------------------------------


def with_test_cases(thresholds: dict | None, test_cases_dataset_id: int | None) -> dict | None:
    """``thresholds`` with the scenario's test-case dataset (a form's or the API's own field)."""
    if test_cases_dataset_id is None:
        return thresholds
    return {**(thresholds or {}), TEST_CASES: test_cases_dataset_id}


def launch_certification(**launch: Any) -> Certification:
    """``launch_or_get_certification``'s certification alone."""
    return launch_or_get_certification(**launch)[0]


def launch_or_get_certification(
    *,
    version: ModelVersion,
    profile_key: str,
    level: str,
    user: object,
    thresholds: dict | None = None,
    golden_dataset_id: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Certification, bool]:
    """Queue the suite on ``version`` for one profile; the same idempotency key gives it back.

    Returns the certification and whether this call launched it (False: the key's first launch,
    even when that one committed a moment ago in a concurrent request). Raises
    CertificationRefused (or launch_job's LaunchRefused / IdempotencyConflict) with a message a
    user can act on; then no job and no certification exist.
    """
    settings = _certify_settings(
        profile_key, level, thresholds, golden_dataset_id, _policy_thresholds(version.team_id)
    )
    profile = _served_profile(profile_key)
    problem = compatibility_problem(profile.as_pipeline(), version.format, version.details)
    if problem is not None:
        raise CertificationRefused(f"{version} cannot be certified on {profile.key}: {problem}")
    golden = _golden_dataset(
        version, golden_dataset_id, settings["level"], settings.get(TEST_CASES) is not None
    )
    stages = [{"name": CERTIFY_STAGE, "settings": settings}]
    # One transaction: the worker that takes the job (enqueued on commit) finds the row.
    with transaction.atomic():
        job, created = launch_job(
            version=version, user=user, stages=stages, idempotency_key=idempotency_key
        )
        cert, _ = Certification.objects.get_or_create(
            job=job,
            version=version,
            defaults={
                "team_id": version.team_id,
                "profile": profile,
                "level": settings["level"],
                "settings": settings,
                "golden_dataset": golden,
                "created_by": user if getattr(user, "is_authenticated", False) else None,
            },
        )
    return cert, created


def runnable_profiles(version: ModelVersion) -> tuple[list[HardwareProfile], list[tuple[str, str]]]:
    """The live profiles whose runtime can run the version's format (and compile details), and
    the other live profiles with why not, as (profile key, reason)."""
    runnable, skipped = [], []
    for profile in live_profiles().order_by("backend", "device_kind", "device_name", "key"):
        problem = compatibility_problem(profile.as_pipeline(), version.format, version.details)
        if problem is None:
            runnable.append(profile)
        else:
            skipped.append((profile.key, problem))
    return runnable, skipped


def launch_everywhere(
    version: ModelVersion,
    level: str,
    launched_by: object,
    golden_dataset_id: int | None = None,
    thresholds: dict | None = None,
    *,
    idempotency_key: str | None = None,
) -> Everywhere:
    """Queue the suite on ``version`` on every live profile that can run it, at one level.

    Each profile is launched by ``launch_or_get_certification``, with its refusals and its own
    transaction, so a refused profile is skipped with its reason and the others still launch.
    With an idempotency key each profile gets a key derived from it: the same request again
    gives back the same certifications. Raises CertificationRefused when nothing was launched.
    """
    runnable, skipped = runnable_profiles(version)
    if not runnable:
        served = ", ".join(key for key, _ in skipped) or "none"
        raise CertificationRefused(
            f"no live worker serves a profile that runs {version} ({version.format}); profiles "
            f"served now: {served}. Start a worker on that hardware."
        )
    # What every profile shares is checked once, so a bad threshold is one refusal, not N skips.
    _certify_settings(runnable[0].key, level, thresholds, golden_dataset_id)
    has_cases = (thresholds or {}).get(TEST_CASES) is not None
    _golden_dataset(version, golden_dataset_id, level, has_cases)
    launched, refusals = [], []
    for profile in runnable:
        try:
            cert = launch_certification(
                version=version,
                profile_key=profile.key,
                level=level,
                user=launched_by,
                thresholds=thresholds,
                golden_dataset_id=golden_dataset_id,
                idempotency_key=_profile_idempotency_key(idempotency_key, profile.key),
            )
        except LaunchRefused as exc:
            refusals.append((profile.key, str(exc)))
        else:
            launched.append(cert)
    if not launched:
        reasons = dict.fromkeys(reason for _, reason in refusals)  # one refusal often hits all
        raise CertificationRefused(
            f"no certification of {version} could be launched: {'; '.join(reasons)}"
        )
    return Everywhere(launched, sorted(skipped + refusals))


def _profile_idempotency_key(key: str | None, profile_key: str) -> str | None:
    if not key:
        return None
    return hashlib.sha256(f"{key}\n{profile_key}".encode()).hexdigest()


def _policy_thresholds(team_id: int) -> dict[str, float]:
    """The team's certification criteria (none without a policy)."""
    policy = CriteriaPolicy.objects.filter(team_id=team_id).first()
    return policy.thresholds() if policy is not None else {}


def _certify_settings(
    profile_key: str,
    level: str,
    thresholds: dict | None,
    golden_dataset_id: int | None,
    team_defaults: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The certify stage's settings as asked, checked by CertifySettings; refused with a reason.

    ``team_defaults`` (the team policy's criteria) fill what ``thresholds`` leaves unset."""
    if thresholds is not None and not isinstance(thresholds, dict):
        raise CertificationRefused('thresholds must be a JSON object, e.g. {"p99_budget_ms": 50}')
    thresholds = dict(thresholds or {})
    misplaced = [k for k in thresholds if k in LAUNCH_SETTINGS]
    if misplaced:
        raise CertificationRefused(
            f"{', '.join(misplaced)} cannot be set in thresholds: use the field of that name"
        )
    unknown = sorted(k for k in thresholds if k not in THRESHOLDS)
    if unknown:
        raise CertificationRefused(
            f"unknown threshold {', '.join(map(repr, unknown))}; known: {', '.join(THRESHOLDS)}"
        )
    settings: dict[str, Any] = {
        "profile": profile_key,
        "level": level,
        **(team_defaults or {}),
        **thresholds,
    }
    if golden_dataset_id is not None:
        settings["golden_dataset_id"] = golden_dataset_id
    try:
        CertifySettings.model_validate(settings)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if where else message)
        raise CertificationRefused("; ".join(lines)) from None
    return settings


def _served_profile(key: str) -> HardwareProfile:
    problem = serving_problem(key)
    if problem is not None:
        raise CertificationRefused(problem)
    return HardwareProfile.objects.get(key=key)


def _golden_dataset(
    version: ModelVersion, dataset_id: int | None, level: str, has_cases: bool = False
) -> Dataset | None:
    """The team's golden dataset, with a target where the scenario needs expected outputs (and
    has no test cases to judge instead). A language model's golden set is text (its perplexity
    and prompts), and its scenario is judged on text test cases only.

    Whether its columns fit the model's input is checked by launch_job (check_datasets).
    """
    text = is_text_format(version.format)
    if text and level == Level.SCENARIO and not has_cases:
        raise CertificationRefused(
            "the scenario level of a language model judges a text test-case dataset: choose "
            "one (test_cases_dataset_id), or certify at performance"
        )
    if dataset_id is None:
        return None
    dataset = Dataset.objects.filter(team_id=version.team_id, pk=dataset_id).first()
    if dataset is None:
        raise CertificationRefused(f"dataset {dataset_id} does not exist in this team")
    if text:
        kind = (dataset.schema or {}).get("text_kind")
        if kind not in TEXT_GOLDEN_KINDS:
            what = f"a {kind} dataset" if kind else "not a text dataset"
            raise CertificationRefused(
                f"{dataset} is {what}; a language model's golden set is text rows (text, "
                "prompt/completion or messages): its perplexity and prompts come from them"
            )
        return dataset
    if level == Level.SCENARIO and not has_cases and not _target_of(dataset):
        raise CertificationRefused(
            f"the scenario level judges the model on expected outputs, and {dataset} has no "
            f"target column (none named, and no {' / '.join(TARGET_NAMES)} column); upload it "
            "again naming its target, or certify at performance"
        )
    return dataset


def _target_of(dataset: Dataset) -> str | None:
    """The dataset's target: the one named at upload, else the column evaluate and quantize
    would take (label, target or y), as the suite does."""
    if dataset.target:
        return dataset.target
    return default_target(c.get("name") for c in (dataset.schema or {}).get("columns", []))


# -- the end of a job ------------------------------------------------------------------------------


def job_ended(job: Job) -> None:
    """A job ended: its certifications still waiting for a report end in error."""
    if job.error:
        reason = job.error
    elif job.status == JobStatus.CANCELLED:
        reason = "cancelled"
    else:
        reason = f"the job ended ({job.status}) without a certification report"
    Certification.objects.filter(job=job, status=CertStatus.PENDING).update(
        status=CertStatus.ERROR, error=reason[:4000], finished_at=timezone.now()
    )


# -- questions -------------------------------------------------------------------------------------


def validity(cert: Certification) -> Validity:
    """Whether a certification is a valid certificate now, and if not, why.

    Valid iff it passed, the version's stored file still hashes to the certified sha256, and the
    profile still runs the backend version it was certified under.
    """
    if cert.status == CertStatus.PENDING:
        return Validity(False, ["the suite has not finished"], "pending")
    if cert.status == CertStatus.ERROR:
        return Validity(False, [cert.error or "the job ended without a report"], "error")
    if cert.status == CertStatus.FAILED:
        checks = (cert.report or {}).get("checks", [])
        failed = ", ".join(c["id"] for c in checks if c["verdict"] == "fail") or "see the report"
        return Validity(False, [f"checks failed: {failed}"], "failed")
    reasons = []
    problem = _file_problem(cert)
    if problem:
        reasons.append(problem)
    certified_under = str((cert.profile_snapshot or {}).get("backend_version", ""))
    if cert.profile.backend_version != certified_under:
        reasons.append(
            f"profile {cert.profile.key} now runs {cert.profile.backend} "
            f"{cert.profile.backend_version}; it was certified under {certified_under or '?'}"
        )
    return Validity(not reasons, reasons, "invalid" if reasons else "valid")


def _file_problem(cert: Certification) -> str | None:
    try:
        digest = storage.sha256_cached(storage.media_path(cert.version.file))
    except (OSError, ValueError):
        return "the certified file is missing from storage"
    if digest != cert.engine_sha256:
        return (
            f"the stored file changed since it was certified (sha256 {digest[:12]}…, "
            f"certified {cert.engine_sha256[:12]}…)"
        )
    return None


def is_certified(version: ModelVersion, level: str, profile_key: str) -> CertAnswer:
    """Whether ``version`` holds a valid certificate at ``level`` (or above) for the profile."""
    try:
        Level(level)
    except ValueError:
        known = ", ".join(lv.value for lv in Level)
        return CertAnswer(False, None, f"unknown level {level!r}; levels: {known}")
    passed = list(
        Certification.objects.filter(
            version=version, profile__key=profile_key, status=CertStatus.PASSED
        )
        .select_related("profile", "version")
        .order_by("-finished_at", "-pk")
    )
    if not passed:
        return CertAnswer(False, None, f"{version} has no passed certification for {profile_key}")
    high_enough = [c for c in passed if level_at_least(c.level, level)]
    if not high_enough:
        best = passed[0].level
        return CertAnswer(
            False, None, f"{version} is certified for {profile_key} at {best}, below {level}"
        )
    reasons = []
    for cert in high_enough:
        checked = validity(cert)
        if checked.valid:
            return CertAnswer(True, cert, f"certificate #{cert.pk} ({cert.level}) is valid")
        reasons.append(f"certificate #{cert.pk} is no longer valid: {'; '.join(checked.reasons)}")
    return CertAnswer(False, None, reasons[0])


# -- the JSON document -----------------------------------------------------------------------------


def profile_of(cert: Certification) -> dict[str, Any]:
    """The profile as the suite saw it; the profile's current state until the suite ran."""
    return cert.profile_snapshot or cert.profile.as_pipeline().to_dict()


def _dataset_ref(dataset: Dataset | None) -> DatasetRef | None:
    if dataset is None:
        return None
    return DatasetRef(
        id=dataset.pk,
        name=dataset.name,
        version=dataset.version,
        sha256=dataset.sha256,
        target=dataset.target,
    )


def certificate_document(cert: Certification) -> dict[str, Any]:
    """The certificate as the versioned JSON document (docs/certificate.schema.json)."""
    version = cert.version
    model = version.model
    report = SuiteReport.model_validate(cert.report) if cert.report else None
    snapshot = profile_of(cert)
    golden = cert.golden_dataset
    checked = validity(cert)
    now = timezone.now()
    document = CertificateDocument(
        certificate_id=cert.pk,
        status=cert.status,
        verdict=report.verdict if report else None,
        level=cert.level,
        model=ModelRef(id=model.pk, name=model.name, task=model.task, team=model.team.slug),
        version=VersionRef(
            id=version.pk,
            number=version.number,
            format=version.format,
            precision=version.precision,
            backend=version.backend,
            sha256=version.sha256,
            size_bytes=version.size_bytes,
            mlflow_version=version.mlflow_version,
        ),
        engine_sha256=cert.engine_sha256,
        profile=ProfileRef(
            label=Profile.from_dict(snapshot).label,
            **{k: v for k, v in snapshot.items() if k in ProfileRef.model_fields},
        ),
        suite_version=cert.suite_version or (report.suite_version if report else ""),
        thresholds=report.thresholds if report else dict(cert.settings),
        criteria=report.criteria if report else [],
        checks=report.checks if report else [],
        golden=report.golden if report else {},
        golden_dataset=_dataset_ref(golden),
        test_cases_dataset=_dataset_ref(
            Dataset.objects.filter(
                team_id=cert.team_id, pk=(cert.settings or {}).get(TEST_CASES) or 0
            ).first()
        ),
        reference=report.reference if report else None,
        lineage=[
            LineageEntry(
                version_id=v.pk,
                number=v.number,
                format=v.format,
                precision=v.precision,
                backend=v.backend,
                sha256=v.sha256,
                job_id=v.job_id,
                created_at=v.created_at,
            )
            for v in registry.lineage(version)
        ],
        job_id=cert.job_id,
        launched_by=cert.created_by.get_username() if cert.created_by else None,
        launched_at=cert.created_at,
        started_at=report.started_at if report else None,
        finished_at=cert.finished_at,
        error=cert.error,
        validity=ValidityRef(
            state=checked.state, valid=checked.valid, reasons=checked.reasons, checked_at=now
        ),
        generated_at=now,
    )
    return document.model_dump(mode="json")
