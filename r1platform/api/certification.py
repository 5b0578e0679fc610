"""Hardware profiles and certifications: ``/api/v1/profiles``, ``/api/v1/certifications`` (and
``/everywhere``) and ``/api/v1/versions/{id}/certified``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Exists, OuterRef
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Field, Router, Schema, Status

from r1platform.accounts.scoping import get_scoped_or_404
from r1platform.api.auth import team_id
from r1platform.api.errors import Unsent, unsent
from r1platform.api.schemas import ErrorOut, Errors, page_limit, username
from r1platform.certification import services as certification
from r1platform.certification.models import Certification
from r1platform.certification.reports import stored_report
from r1platform.jobs import services as jobs
from r1platform.registry.models import ModelVersion
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import live_profiles

router = Router(tags=["certification"])


class ProfileOut(Schema):
    key: str
    label: str
    backend: str
    backend_version: str
    device_kind: str
    device_name: str
    compute_capability: str
    isa: list[str]
    driver_version: str
    cuda_version: str
    total_memory_mb: float
    first_seen: datetime
    last_seen: datetime
    served: bool = Field(description="A live worker offers this profile now.")


class CertificationIn(Schema):
    version_id: int
    profile: str = Field(description="The hardware profile's key (GET /profiles).")
    level: str = Field("basic", description="basic, performance or scenario.")
    thresholds: dict[str, Any] | None = Field(
        None, description="Over the defaults; the certify stage's settings schema lists them."
    )
    golden_dataset_id: int | None = None
    test_cases_dataset_id: int | None = Field(
        None, description="A test-case dataset the scenario level judges (its cases, must first)."
    )
    idempotency_key: str | None = None


class EverywhereIn(Schema):
    version_id: int
    level: str = Field("basic", description="basic, performance or scenario.")
    thresholds: dict[str, Any] | None = Field(
        None, description="Over the defaults; the certify stage's settings schema lists them."
    )
    golden_dataset_id: int | None = None
    test_cases_dataset_id: int | None = None


class MeasurementOut(Schema):
    name: str
    value: float | int | bool | str | None
    threshold: float | int | bool | str | None
    comparison: str
    unit: str
    passed: bool | None


class CheckOut(Schema):
    id: str
    title: str
    verdict: str = Field(description="pass, fail or not_run.")
    summary: str
    measurements: list[MeasurementOut]
    details: dict[str, Any]
    seconds: float


class ValidityOut(Schema):
    valid: bool
    state: str = Field(description="valid, invalid, failed, pending or error.")
    reasons: list[str]


class CertificationOut(Schema):
    id: int
    status: str = Field(description="pending, passed, failed or error.")
    verdict: str | None
    level: str
    version_id: int
    model_id: int
    profile: str
    profile_label: str
    job_id: int | None
    golden_dataset_id: int | None
    settings: dict[str, Any]
    thresholds: dict[str, Any]
    engine_sha256: str
    suite_version: str
    criteria: list[dict[str, Any]] = Field(
        description=(
            "The source's three criteria, basic first: level, title, check, verdict, value, "
            "threshold, comparison, unit, summary (empty until the suite ran)."
        )
    )
    checks: list[CheckOut]
    validity: ValidityOut
    error: str
    created_by: str | None
    created_at: datetime
    finished_at: datetime | None
    reports: dict[str, str] = Field(description="kind (html, pdf, json) -> URL, once rendered.")

    # The suite's report (a JSON field, empty until the suite ran) carries verdict and checks.
    @staticmethod
    def resolve_verdict(cert: Certification) -> str | None:
        return (cert.report or {}).get("verdict")

    @staticmethod
    def resolve_thresholds(cert: Certification) -> dict[str, Any]:
        return (cert.report or {}).get("thresholds", {})

    @staticmethod
    def resolve_checks(cert: Certification) -> list[dict[str, Any]]:
        return (cert.report or {}).get("checks", [])

    @staticmethod
    def resolve_criteria(cert: Certification) -> list[dict[str, Any]]:
        return (cert.report or {}).get("criteria", [])

    @staticmethod
    def resolve_model_id(cert: Certification) -> int:
        return cert.version.model_id

    @staticmethod
    def resolve_profile(cert: Certification) -> str:
        return cert.profile.key

    @staticmethod
    def resolve_profile_label(cert: Certification) -> str:
        return cert.profile.label

    @staticmethod
    def resolve_validity(cert: Certification) -> certification.Validity:
        # Computed when asked: the file's hash and the profile's runtime are checked now.
        return certification.validity(cert)

    @staticmethod
    def resolve_created_by(cert: Certification) -> str | None:
        return username(cert.created_by)

    @staticmethod
    def resolve_reports(cert: Certification) -> dict[str, str]:
        return {
            kind: reverse(f"api:certification_report_{kind}", args=[cert.pk])
            for kind in certification.REPORT_KINDS
            if getattr(cert, f"report_{kind}")
        }


class SkippedOut(Schema):
    profile: str = Field(description="The live profile's key.")
    reason: str = Field(description="Why no certification was launched on it.")


class EverywhereOut(Schema):
    certifications: list[CertificationOut]
    skipped: list[SkippedOut]


class CertifiedOut(Schema):
    certified: bool
    certification_id: int | None
    reason: str
    level: str
    profile: str


def _get_certification(request: HttpRequest, certification_id: int) -> Certification:
    qs = Certification.objects.select_related("version__model", "profile", "created_by")
    return get_scoped_or_404(qs, [team_id(request)], pk=certification_id)


@router.get("/profiles", response=list[ProfileOut])
def list_profiles(request: HttpRequest, served: bool | None = None):
    """Every hardware profile a worker has reported, and whether a live worker serves it now."""
    found = HardwareProfile.objects.annotate(
        served=Exists(live_profiles().filter(pk=OuterRef("pk")))
    )
    if served is not None:
        found = found.filter(served=served)
    return found


@router.post(
    "/certifications",
    response={200: CertificationOut, 201: CertificationOut, **Errors, **Unsent},
)
def create_certification(request: HttpRequest, payload: CertificationIn, response: HttpResponse):
    """Queue the certification suite on a version for one profile; refused with 400 up front.

    The same idempotency_key again returns the first certification (200). 503 (with Retry-After)
    when it is stored but the broker cannot take its job now: it is sent once the broker is back.
    """
    team = team_id(request)
    version = get_scoped_or_404(ModelVersion.objects.all(), [team], pk=payload.version_id)
    key = (payload.idempotency_key or "").strip()
    try:
        cert, created = certification.launch_or_get_certification(
            version=version,
            profile_key=payload.profile,
            level=payload.level,
            user=request.user,
            thresholds=certification.with_test_cases(
                payload.thresholds, payload.test_cases_dataset_id
            ),
            golden_dataset_id=payload.golden_dataset_id,
            idempotency_key=key or None,
        )
    except jobs.IdempotencyConflict as exc:
        return Status(409, {"detail": str(exc)})
    except jobs.LaunchRefused as exc:
        return Status(400, {"detail": str(exc)})
    if cert.job is not None and jobs.waits_for_broker(cert.job):
        return unsent(cert.job, response)
    return Status(201 if created else 200, cert)


@router.post("/certifications/everywhere", response={201: EverywhereOut, **Errors})
def certify_everywhere(request: HttpRequest, payload: EverywhereIn):
    """Queue the suite on a version on every live profile whose runtime can run its format.

    Each profile is launched as by POST /certifications; the live profiles that cannot run it, or
    whose launch was refused, are in ``skipped`` with why. 400 when none could be launched. A job
    the broker cannot take now is stored and sent once the broker is back.
    """
    version = get_scoped_or_404(
        ModelVersion.objects.all(), [team_id(request)], pk=payload.version_id
    )
    try:
        launched, skipped = certification.launch_everywhere(
            version,
            payload.level,
            request.user,
            golden_dataset_id=payload.golden_dataset_id,
            thresholds=certification.with_test_cases(
                payload.thresholds, payload.test_cases_dataset_id
            ),
        )
    except jobs.LaunchRefused as exc:
        return Status(400, {"detail": str(exc)})
    body = {
        "certifications": launched,
        "skipped": [{"profile": key, "reason": reason} for key, reason in skipped],
    }
    return Status(201, body)


@router.get("/certifications", response=list[CertificationOut])
def list_certifications(
    request: HttpRequest,
    version_id: int | None = None,
    profile: str = "",
    status: str = "",
    limit: int = 50,
    offset: int = 0,
):
    found = Certification.objects.filter(team_id=team_id(request)).select_related(
        "version__model", "profile", "created_by"
    )
    if version_id is not None:
        found = found.filter(version_id=version_id)
    if profile:
        found = found.filter(profile__key=profile)
    if status:
        found = found.filter(status=status)
    return found.order_by("-created_at", "-pk")[offset : offset + page_limit(limit)]


@router.get("/certifications/{certification_id}", response={200: CertificationOut, 404: ErrorOut})
def get_certification(request: HttpRequest, certification_id: int):
    """Status, verdict, each check with its measurements, and whether the certificate holds now."""
    return _get_certification(request, certification_id)


def _report(request: HttpRequest, certification_id: int, kind: str):
    report = stored_report(_get_certification(request, certification_id), kind)
    if report is None:
        return Status(404, {"detail": f"certification {certification_id} has no {kind} report yet"})
    response = HttpResponse(report.data, content_type=report.content_type)
    response["Content-Disposition"] = f'attachment; filename="{report.filename}"'
    return response


@router.get(
    "/certifications/{certification_id}/report.html",
    response={404: ErrorOut},
    url_name="certification_report_html",
)
def certification_report_html(request: HttpRequest, certification_id: int):
    """The standalone HTML report (404 until the suite has finished)."""
    return _report(request, certification_id, "html")


@router.get(
    "/certifications/{certification_id}/report.pdf",
    response={404: ErrorOut},
    url_name="certification_report_pdf",
)
def certification_report_pdf(request: HttpRequest, certification_id: int):
    """The PDF report (404 until the suite has finished)."""
    return _report(request, certification_id, "pdf")


@router.get(
    "/certifications/{certification_id}/report.json",
    response={404: ErrorOut},
    url_name="certification_report_json",
)
def certification_report_json(request: HttpRequest, certification_id: int):
    """The certificate document (schema: docs/certificate.schema.json); 404 until finished."""
    return _report(request, certification_id, "json")


@router.get("/versions/{version_id}/certified", response={200: CertifiedOut, 404: ErrorOut})
def version_certified(request: HttpRequest, version_id: int, profile: str, level: str = "basic"):
    """Whether the version holds a valid certificate at ``level`` (or above) for ``profile``."""
    version = get_scoped_or_404(ModelVersion.objects.all(), [team_id(request)], pk=version_id)
    answer = certification.is_certified(version, level, profile)
    return {
        "certified": answer.certified,
        "certification_id": answer.certification.pk if answer.certification else None,
        "reason": answer.reason,
        "level": level,
        "profile": profile,
    }
