"""Serving pools and promotion: promote, roll back, approve or reject, and read what each pool
serves and the audit log (``/api/v1/pools``, ``/api/v1/models/{id}/...``, ``/api/v1/promotions``).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from django.db.models import QuerySet
from django.http import HttpRequest
from ninja import Field, Router, Schema, Status

from r1platform.accounts.scoping import get_scoped_or_404
from r1platform.api.auth import team_id
from r1platform.api.schemas import ErrorOut, Errors, VersionRefOut, page_limit, username
from r1platform.certification import services as certification
from r1platform.deployments import services as deployments
from r1platform.deployments.models import (
    AuditEvent,
    Deployment,
    PromotionRequest,
    ServingPool,
)
from r1platform.registry.models import ModelVersion, RegisteredModel

router = Router(tags=["promotion"])


class PoolOut(Schema):
    name: str
    description: str
    profile: str = Field(description="The hardware profile's key: what this pool serves on.")
    profile_label: str
    backend: str
    max_queue_delay_ms: float
    max_batch_size: int

    @staticmethod
    def resolve_profile(pool: ServingPool) -> str:
        return pool.profile.key

    @staticmethod
    def resolve_profile_label(pool: ServingPool) -> str:
        return pool.profile.label

    @staticmethod
    def resolve_backend(pool: ServingPool) -> str:
        return pool.profile.backend


class PromoteIn(Schema):
    version_id: int
    pool: str = Field(description="The serving pool's name (GET /pools).")
    stage: Literal["staging", "production"]
    reason: str = ""


class RollbackIn(Schema):
    pool: str
    stage: Literal["staging", "production"] = "production"
    reason: str = ""


class DecisionIn(Schema):
    reason: str = ""


class DeploymentCertOut(Schema):
    id: int
    level: str
    valid: bool
    state: str = Field(description="valid, invalid, failed, pending or error.")
    reasons: list[str]


class DeploymentOut(Schema):
    pool: str
    profile: str
    stage: str
    version: VersionRefOut
    previous_version: VersionRefOut | None
    certification: DeploymentCertOut | None = Field(
        description="The certificate the version was promoted on, and whether it holds now."
    )
    generation: int = Field(description="Bumped on every change; the serving runtime polls it.")
    updated_at: datetime
    updated_by: str | None

    @staticmethod
    def resolve_pool(deployment: Deployment) -> str:
        return deployment.pool.name

    @staticmethod
    def resolve_profile(deployment: Deployment) -> str:
        return deployment.pool.profile.key

    @staticmethod
    def resolve_certification(deployment: Deployment) -> dict[str, Any] | None:
        cert = deployment.certification
        if cert is None:
            return None
        # Whether it holds is computed now (the file's hash, the profile's runtime version).
        checked = certification.validity(cert)
        return {
            "id": cert.pk,
            "level": cert.level,
            "valid": checked.valid,
            "state": checked.state,
            "reasons": checked.reasons,
        }

    @staticmethod
    def resolve_updated_by(deployment: Deployment) -> str | None:
        return username(deployment.updated_by)


class PromotionRequestOut(Schema):
    id: int
    model_id: int
    pool: str
    stage: str
    version: VersionRefOut
    status: str = Field(description="pending, approved, rejected, refused or superseded.")
    reason: str
    requested_by: str | None
    requested_label: str
    decided_by: str | None
    decision_reason: str
    created_at: datetime
    decided_at: datetime | None

    @staticmethod
    def resolve_pool(request: PromotionRequest) -> str:
        return request.pool.name

    @staticmethod
    def resolve_requested_by(request: PromotionRequest) -> str | None:
        return username(request.requested_by)

    @staticmethod
    def resolve_decided_by(request: PromotionRequest) -> str | None:
        return username(request.decided_by)


class PromotionOut(Schema):
    status: str = Field(description="promoted, rolled_back or pending.")
    reason: str
    deployment: DeploymentOut | None
    request: PromotionRequestOut | None


class AuditEventOut(Schema):
    id: int
    action: str = Field(
        description="promoted, rolled_back, refused, requested, approved or rejected."
    )
    pool: str | None
    stage: str
    version: VersionRefOut | None
    previous_version: VersionRefOut | None
    actor: str | None
    actor_label: str
    reason: str
    created_at: datetime

    @staticmethod
    def resolve_pool(event: AuditEvent) -> str | None:
        return event.pool.name if event.pool else None

    @staticmethod
    def resolve_actor(event: AuditEvent) -> str | None:
        return username(event.actor)


def _deployments() -> QuerySet[Deployment]:
    return Deployment.objects.select_related(
        "pool__profile", "version", "previous_version", "certification__profile",
        "certification__version", "updated_by",
    )  # fmt: skip


def _answer(outcome: deployments.PromotionOutcome) -> deployments.PromotionOutcome:
    """The outcome with its deployment read again, so the answer shows what a GET shows."""
    if outcome.deployment is None:
        return outcome
    return replace(outcome, deployment=_deployments().get(pk=outcome.deployment.pk))


def _refusal(outcome: deployments.PromotionOutcome) -> Status:
    return Status(403 if outcome.forbidden else 409, {"detail": outcome.reason})


def _actor_label(request: HttpRequest) -> str:
    token = request.auth  # type: ignore[attr-defined]
    return f"token {token.name or token.prefix}"


def _get_model(request: HttpRequest, model_id: int) -> RegisteredModel:
    return get_scoped_or_404(
        RegisteredModel.objects.select_related("team"), [team_id(request)], pk=model_id
    )


def _get_pool(name: str) -> ServingPool | None:
    return ServingPool.objects.select_related("profile").filter(name=name).first()


def _no_pool(name: str) -> Status:
    known = ", ".join(ServingPool.objects.values_list("name", flat=True)) or "none"
    return Status(400, {"detail": f"no serving pool named {name!r}; pools: {known}"})


def _get_request(request: HttpRequest, request_id: int) -> PromotionRequest:
    qs = PromotionRequest.objects.select_related("model__team", "pool", "version", "requested_by")
    return get_scoped_or_404(qs, [team_id(request)], pk=request_id)


@router.get("/pools", response=list[PoolOut])
def list_pools(request: HttpRequest):
    """Every serving pool and the hardware profile it serves on."""
    return ServingPool.objects.select_related("profile")


@router.post(
    "/models/{model_id}/promote", response={201: PromotionOut, 202: PromotionOut, **Errors}
)
def promote(request: HttpRequest, model_id: int, payload: PromoteIn):
    """Serve a certified version in a pool at a stage: 201 when done, 202 when it waits for
    another member's approval, 409 with the reason when the gate refuses (the refusal is audited).
    """
    model = _get_model(request, model_id)
    version = get_scoped_or_404(
        ModelVersion.objects.all(), [team_id(request)], pk=payload.version_id
    )
    pool = _get_pool(payload.pool)
    if pool is None:
        return _no_pool(payload.pool)
    outcome = deployments.promote(
        model=model,
        version=version,
        pool=pool,
        stage=payload.stage,
        actor=request.user,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    if outcome.refused:
        return _refusal(outcome)
    return Status(202 if outcome.status == "pending" else 201, _answer(outcome))


@router.post("/models/{model_id}/rollback", response={200: PromotionOut, **Errors})
def rollback(request: HttpRequest, model_id: int, payload: RollbackIn):
    """Serve the slot's previous version again (through the gate); 409 when there is none or its
    certificate no longer holds."""
    model = _get_model(request, model_id)
    pool = _get_pool(payload.pool)
    if pool is None:
        return _no_pool(payload.pool)
    outcome = deployments.rollback(
        model=model,
        pool=pool,
        stage=payload.stage,
        actor=request.user,
        actor_label=_actor_label(request),
        reason=payload.reason,
    )
    if outcome.refused:
        return _refusal(outcome)
    return _answer(outcome)


@router.get("/models/{model_id}/deployments", response={200: list[DeploymentOut], 404: ErrorOut})
def list_deployments(request: HttpRequest, model_id: int):
    """What each pool serves for the model at each stage, and whether its certificate holds now."""
    return _deployments().filter(model=_get_model(request, model_id))


@router.get(
    "/models/{model_id}/promotions", response={200: list[PromotionRequestOut], 404: ErrorOut}
)
def list_promotion_requests(
    request: HttpRequest, model_id: int, status: str = "", limit: int = 50, offset: int = 0
):
    """The model's promotion requests, newest first (``status=pending`` for those waiting)."""
    model = _get_model(request, model_id)
    found = model.promotion_requests.select_related("pool", "version", "requested_by", "decided_by")
    if status:
        found = found.filter(status=status)
    return found.order_by("-created_at", "-pk")[offset : offset + page_limit(limit)]


@router.post(
    "/promotions/{request_id}/approve", response={200: PromotionOut, 403: ErrorOut, **Errors}
)
def approve_promotion(request: HttpRequest, request_id: int, payload: DecisionIn):
    """Approve another member's request: the gate is asked again and the version served (200);
    403 for one's own request, 409 when it is no longer pending or the gate refuses."""
    outcome = deployments.approve(_get_request(request, request_id), request.user, payload.reason)
    if outcome.refused:
        return _refusal(outcome)
    return _answer(outcome)


@router.post(
    "/promotions/{request_id}/reject",
    response={200: PromotionRequestOut, 403: ErrorOut, **Errors},
)
def reject_promotion(request: HttpRequest, request_id: int, payload: DecisionIn):
    """Turn down another member's request (403 for one's own, 409 when no longer pending)."""
    outcome = deployments.reject(_get_request(request, request_id), request.user, payload.reason)
    if outcome.refused:
        return _refusal(outcome)
    return _get_request(request, request_id)


@router.get("/models/{model_id}/audit", response={200: list[AuditEventOut], 404: ErrorOut})
def list_audit_events(
    request: HttpRequest, model_id: int, action: str = "", limit: int = 100, offset: int = 0
):
    """Every promotion, rollback, refusal, request and decision on the model, newest first."""
    model = _get_model(request, model_id)
    found = AuditEvent.objects.filter(model=model).select_related(
        "pool", "version", "previous_version", "actor"
    )
    if action:
        found = found.filter(action=action)
    return found[offset : offset + page_limit(limit)]
