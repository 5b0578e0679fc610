"""Recording a finished suite: the report a worker hands back becomes the certification's verdict.

The report is stored on the row, rendered to JSON, HTML and PDF under storage, and logged to the
job's MLflow run; a passed one also tags the version's MLflow model version. This sits above
``services`` and ``reports`` (it renders what they describe), so neither imports it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from django.db import IntegrityError, transaction
from django.utils import timezone

from pipelines.certification.profiles import HardwareProfile as Profile
from pipelines.certification.report import SuiteReport
from r1platform.certification.models import Certification, CertStatus
from r1platform.certification.reports import render_html, render_pdf
from r1platform.certification.services import CERTIFY_STAGE, REPORT_KINDS, certificate_document
from r1platform.core import storage, tracking
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import mlflow_name
from r1platform.workers.models import HardwareProfile

log = logging.getLogger(__name__)

MLFLOW_ARTIFACT_DIR = "certification"


def record_suite(job: Job, version: ModelVersion, report: dict) -> Certification:
    """Store a finished suite's report, render and log it; the same report twice changes nothing.

    Called on the worker after a certify stage succeeded (``certification.signals``, through
    ``jobs.signals.certification_reported``). A certify stage inside a longer pipeline has no
    row yet: it is made here from the report and the job's settings.
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
