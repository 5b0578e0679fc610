"""Certification: launch the suite on a version for a profile, record its verdict, and answer
"is version V certified at level L for profile P?".

Every refusal happens before anything is queued. The report a worker hands back is stored on
the row, rendered to JSON, HTML and PDF under storage, and logged to the job's MLflow run; a
passed one also tags the version's MLflow model version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from django.db import IntegrityError, transaction
from django.utils import timezone
from pydantic import ValidationError

from pipelines.certification.profiles import HardwareProfile as Profile
from pipelines.certification.profiles import compatibility_problem
from pipelines.certification.report import Level, SuiteReport, level_at_least
from pipelines.stages.certify import CertifySettings
from r1platform.certification.document import (
    CertificateDocument,
    DatasetRef,
    LineageEntry,
    ModelRef,
    ProfileRef,
    ValidityRef,
    VersionRef,
)
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import storage, tracking
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job, JobStatus
from r1platform.jobs.services import LaunchRefused, launch_job
from r1platform.registry import services as registry
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import mlflow_name
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import serving_problem

log = logging.getLogger(__name__)

CERTIFY_STAGE = "certify"
# Settings launch_certification takes as arguments of their own; every other one is a threshold.
LAUNCH_SETTINGS = ("profile", "level", "golden_dataset_id")
THRESHOLDS = tuple(name for name in CertifySettings.model_fields if name not in LAUNCH_SETTINGS)
REPORT_KINDS = ("json", "html", "pdf")
MLFLOW_ARTIFACT_DIR = "certification"

State = Literal["valid", "invalid", "failed", "pending", "error"]


class CertificationRefused(LaunchRefused):
    """The certification cannot run as asked; nothing was queued."""


@dataclass(frozen=True)
class Validity:
    valid: bool
    reasons: list[str]
    state: State


@dataclass(frozen=True)
class CertAnswer:
    certified: bool
    certification: Certification | None
    reason: str


# -- launch ----------------------------------------------------------------------------------------


def launch_certification(
    *,
    version: ModelVersion,
    profile_key: str,
    level: str,
    user: object,
    thresholds: dict | None = None,
    golden_dataset_id: int | None = None,
    idempotency_key: str | None = None,
) -> Certification:
    """Queue the suite on ``version`` for one profile; the same idempotency key gives it back.

    Raises CertificationRefused (or launch_job's LaunchRefused / IdempotencyConflict) with a
    message a user can act on; then no job and no certification exist.
    """
    settings = _certify_settings(profile_key, level, thresholds, golden_dataset_id)
    profile = _served_profile(profile_key)
    problem = compatibility_problem(profile.as_pipeline(), version.format, version.details)
    if problem is not None:
        raise CertificationRefused(f"{version} cannot be certified on {profile.key}: {problem}")
    golden = _golden_dataset(version, golden_dataset_id, settings["level"])
    stages = [{"name": CERTIFY_STAGE, "settings": settings}]
    # One transaction: the worker that takes the job (enqueued on commit) finds the row.
    with transaction.atomic():
        job, _ = launch_job(
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
    return cert


def _certify_settings(
    profile_key: str, level: str, thresholds: dict | None, golden_dataset_id: int | None
) -> dict[str, Any]:
    """The certify stage's settings as asked, checked by CertifySettings; refused with a reason."""
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
    settings: dict[str, Any] = {"profile": profile_key, "level": level, **thresholds}
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


def _golden_dataset(version: ModelVersion, dataset_id: int | None, level: str) -> Dataset | None:
    """The team's golden dataset, with a target where the scenario needs expected outputs.

    Whether its columns fit the model's input is checked by launch_job (check_datasets).
    """
    if dataset_id is None:
        return None
    dataset = Dataset.objects.filter(team_id=version.team_id, pk=dataset_id).first()
    if dataset is None:
        raise CertificationRefused(f"dataset {dataset_id} does not exist in this team")
    if level == Level.SCENARIO and not dataset.target:
        raise CertificationRefused(
            f"the scenario level judges the model on expected outputs, and {dataset} has no "
            "target column; upload it again naming its target, or certify at performance"
        )
    return dataset


# -- results from the worker -----------------------------------------------------------------------


def record_suite(job: Job, version: ModelVersion, report: dict) -> Certification:
    """Store a finished suite's report, render and log it; the same report twice changes nothing.

    Called by the runner on the worker after a certify stage succeeded. A certify stage inside a
    longer pipeline has no row yet: it is made here from the report and the job's settings.
    """
    suite = SuiteReport.model_validate(report)
    data = suite.model_dump(mode="json")
    cert = _certification_for(job, version, suite)
    if cert.status != CertStatus.PENDING and cert.report == data and _reports_exist(cert):
        return cert
    cert.report = data
    cert.status = CertStatus.PASSED if suite.verdict == "passed" else CertStatus.FAILED
    cert.level = suite.level.value
    cert.engine_sha256 = str(suite.engine.get("sha256", ""))
    cert.profile_snapshot = suite.profile
    cert.suite_version = suite.suite_version
    cert.error = ""
    cert.finished_at = cert.finished_at or timezone.now()
    cert.save()
    paths = write_reports(cert)
    _track(job, cert, paths)
    return cert


def _certification_for(job: Job, version: ModelVersion, suite: SuiteReport) -> Certification:
    found = Certification.objects.filter(job=job, version=version).first()
    if found is not None:
        return found
    profile = _profile_row(suite.profile)
    settings = next(
        (
            dict(stage.get("settings") or {})
            for stage in job.stages
            if stage.get("name") == CERTIFY_STAGE
            and (stage.get("settings") or {}).get("profile") == profile.key
        ),
        {"profile": profile.key, "level": suite.level.value},
    )
    golden_id = settings.get("golden_dataset_id")
    golden = None
    if golden_id:
        golden = Dataset.objects.filter(team_id=job.team_id, pk=golden_id).first()
    try:
        with transaction.atomic():
            return Certification.objects.create(
                team_id=job.team_id,
                version=version,
                job=job,
                profile=profile,
                level=suite.level.value,
                settings=settings,
                golden_dataset=golden,
                created_by_id=job.created_by_id,
                created_at=job.created_at,
            )
    except IntegrityError:  # the same job recorded by a concurrent delivery
        return Certification.objects.get(job=job, version=version)


def _profile_row(snapshot: dict) -> HardwareProfile:
    """The profile the suite ran on; made from the report if no worker reported it."""
    profile = Profile.from_dict(snapshot)
    values = {
        "backend": profile.backend,
        "backend_version": profile.backend_version,
        "device_kind": profile.device_kind,
        "device_name": profile.device_name,
        "compute_capability": profile.compute_capability,
        "isa": list(profile.isa),
        "driver_version": profile.driver_version,
        "cuda_version": profile.cuda_version,
        "total_memory_mb": profile.total_memory_mb,
        "extra": dict(profile.extra),
    }
    row, _ = HardwareProfile.objects.get_or_create(key=profile.key, defaults=values)
    return row


def report_path(cert: Certification, kind: str) -> str:
    """Where a rendered report is stored, relative to MEDIA_ROOT."""
    return f"certificates/team-{cert.team_id}/cert-{cert.pk}.{kind}"


def _reports_exist(cert: Certification) -> bool:
    stored = [cert.report_json, cert.report_html, cert.report_pdf]
    return all(stored) and all(storage.media_path(p).is_file() for p in stored)


def write_reports(cert: Certification) -> list[Path]:
    """Render the JSON, HTML and PDF reports into storage; returns the files written.

    A PDF that cannot be rendered (WeasyPrint without pango) is logged and left out: the verdict
    and the two other reports are kept.
    """
    # reports renders this module's document, so it is imported here rather than at the top.
    from r1platform.certification.reports import render_html, render_pdf

    rendered: dict[str, bytes] = {
        "json": json.dumps(certificate_document(cert), indent=2).encode(),
        "html": render_html(cert).encode(),
    }
    try:
        rendered["pdf"] = render_pdf(cert)
    except Exception:
        log.exception("could not render the PDF report of certification %s", cert.pk)
    written = {
        kind: storage.write_atomic(report_path(cert, kind), data) for kind, data in rendered.items()
    }
    fields = {f"report_{k}": report_path(cert, k) if k in written else "" for k in REPORT_KINDS}
    Certification.objects.filter(pk=cert.pk).update(**fields)
    for name, value in fields.items():
        setattr(cert, name, value)
    return list(written.values())


def _track(job: Job, cert: Certification, paths: list[Path]) -> None:
    """Log the reports to the job's run and tag the certified MLflow model version; best effort."""
    if job.mlflow_run_id:
        try:
            for path in paths:
                tracking.log_artifact(job.mlflow_run_id, path, MLFLOW_ARTIFACT_DIR)
            tracking.set_tags(
                job.mlflow_run_id,
                {f"r1.certification.{cert.profile.key}": f"{cert.level} {cert.status} #{cert.pk}"},
            )
        except Exception as exc:  # noqa: BLE001 - the tracking store is optional
            log.warning("could not log certification %s to MLflow: %s", cert.pk, exc)
    if cert.status != CertStatus.PASSED:
        return
    version = ModelVersion.objects.select_related("model__team").get(pk=cert.version_id)
    if not version.mlflow_version:
        return
    model = version.model
    tags = {
        f"r1.cert.{cert.profile.key}": f"{cert.level} #{cert.pk}",
        "r1.certified_level": cert.level,
        "r1.certified_profile": cert.profile.key,
        "r1.certificate_id": str(cert.pk),
    }
    try:
        tracking.set_model_version_tags(
            model.mlflow_name or mlflow_name(model.team, model.name), version.mlflow_version, tags
        )
    except Exception as exc:  # noqa: BLE001 - the tracking store is optional
        log.warning("could not tag %s in MLflow with certification %s: %s", version, cert.pk, exc)


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
        checks=report.checks if report else [],
        golden=report.golden if report else {},
        golden_dataset=(
            DatasetRef(
                id=golden.pk,
                name=golden.name,
                version=golden.version,
                sha256=golden.sha256,
                target=golden.target,
            )
            if golden
            else None
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
