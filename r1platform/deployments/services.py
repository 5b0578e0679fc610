"""Promotion: which version each serving pool serves for a model, changed only through the gate.

Every path that changes a ``Deployment`` row (dashboard, API, admin, management commands, a
scheduled job) calls ``promote``, ``rollback`` or ``approve`` here. Each one:

1. locks the slot, through its model's row: the row exists before the slot's first promotion, so
   two first promotions cannot both insert (``select_for_update`` on PostgreSQL; on SQLite the
   project's IMMEDIATE transactions already serialize writers);
2. asks the gate, inside that lock: the version belongs to the model, the pool's hardware profile
   runs its format, and it holds a valid certificate for that profile at the team's level;
3. writes the slot (bumping ``generation``, which the serving runtime polls) and an audit event,
   or, refused, only the audit event;
4. after commit, points the MLflow aliases at what each pool serves (best effort).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from django.db import transaction
from django.utils import timezone

from pipelines.certification.profiles import compatibility_problem
from r1platform.accounts.models import Team
from r1platform.accounts.scoping import teams_for
from r1platform.certification.models import Certification
from r1platform.certification.services import is_certified
from r1platform.core import tracking
from r1platform.deployments.models import (
    Action,
    AuditEvent,
    Deployment,
    PromotionPolicy,
    PromotionRequest,
    RequestStatus,
    ServingPool,
    Stage,
)
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.services import mirror_to_mlflow, mlflow_name

log = logging.getLogger(__name__)

OutcomeStatus = Literal["promoted", "rolled_back", "pending", "rejected", "refused"]


@dataclass(frozen=True)
class PromotionOutcome:
    status: OutcomeStatus
    deployment: Deployment | None
    request: PromotionRequest | None
    reason: str
    # Refused because of who asked (their own request, not a member), not because of the gate.
    forbidden: bool = False

    @property
    def refused(self) -> bool:
        return self.status == "refused"


def policy_for(team: Team) -> PromotionPolicy:
    """The team's policy; without a row, the default (basic level, no approval), unsaved."""
    return PromotionPolicy.objects.filter(team=team).first() or PromotionPolicy(team=team)


def check_gate(
    model: RegisteredModel, version: ModelVersion, pool: ServingPool, level: str
) -> tuple[Certification | None, str]:
    """The certificate that lets ``version`` serve in ``pool``, or None and why not."""
    if version.model_id != model.pk:
        return None, f"{version} is not a version of {model.name}"
    profile = pool.profile
    problem = compatibility_problem(profile.as_pipeline(), version.format, version.details)
    if problem is not None:
        return None, f"pool {pool.name} serves {profile.key}, where {version} cannot run: {problem}"
    answer = is_certified(version, level, profile.key)
    if not answer.certified:
        return None, f"{answer.reason} (pool {pool.name} requires {level})"
    return answer.certification, answer.reason


def promote(
    *,
    model: RegisteredModel,
    version: ModelVersion,
    pool: ServingPool,
    stage: str,
    actor: object,
    actor_label: str = "",
    reason: str = "",
) -> PromotionOutcome:
    """Make ``version`` what ``pool`` serves for ``model`` at ``stage``, if the gate allows it.

    With a team policy that requires approval, a pending request is made instead (the gate is
    asked now, and again when it is approved). An unknown stage raises ValueError.
    """
    stage = Stage(stage).value
    with transaction.atomic():
        slot = _Slot.lock(model, pool, stage, actor, actor_label)
        policy = policy_for(model.team)
        cert, why = check_gate(model, version, pool, policy.required_level)
        if cert is None:
            return slot.refuse(version, why)
        if policy.require_approval:
            request = PromotionRequest.objects.create(
                team_id=model.team_id,
                model=model,
                pool=pool,
                stage=stage,
                version=version,
                reason=reason,
                requested_by=slot.user,
                requested_label=actor_label,
            )
            slot.audit(Action.REQUESTED, version, reason)
            why = f"request #{request.pk} waits for another member of {model.team} to approve it"
            return PromotionOutcome("pending", slot.current, request, why)
        deployment = slot.serve(version, cert)
        slot.audit(Action.PROMOTED, version, reason)
    return PromotionOutcome("promoted", deployment, None, why)


def rollback(
    *,
    model: RegisteredModel,
    pool: ServingPool,
    stage: str = Stage.PRODUCTION,
    actor: object,
    actor_label: str = "",
    reason: str = "",
) -> PromotionOutcome:
    """Serve the slot's previous version again, if its certificate still holds.

    No approval is waited for: the previous version already served, and a rollback is what one
    reaches for when the current one misbehaves. The gate still applies.
    """
    stage = Stage(stage).value
    with transaction.atomic():
        slot = _Slot.lock(model, pool, stage, actor, actor_label)
        target = slot.current.previous_version if slot.current else None
        if target is None:
            return slot.refuse(None, f"{model.name} has no previous {stage} version on {pool}")
        cert, why = check_gate(model, target, pool, policy_for(model.team).required_level)
        if cert is None:
            return slot.refuse(target, f"cannot roll back to {target}: {why}")
        deployment = slot.serve(target, cert)
        slot.audit(Action.ROLLED_BACK, target, reason)
    return PromotionOutcome("rolled_back", deployment, None, why)


def approve(request: PromotionRequest, approver: object, reason: str = "") -> PromotionOutcome:
    """Another member of the team approves a pending request: the gate is asked again, now."""
    with transaction.atomic():
        request, slot = _lock_request(request, approver)
        problem = _decider_problem(request, approver, "approve")
        if problem:
            return slot.refuse(request.version, problem, request, forbidden=True)
        if request.status != RequestStatus.PENDING:
            why = f"request #{request.pk} is already {request.status}"
            return slot.refuse(request.version, why, request)
        level = policy_for(request.team).required_level
        cert, why = check_gate(request.model, request.version, request.pool, level)
        if cert is None:
            _decide(request, RequestStatus.REFUSED, approver, why)
            return slot.refuse(request.version, why, request)
        _decide(request, RequestStatus.APPROVED, approver, reason)
        slot.audit(Action.APPROVED, request.version, reason)
        deployment = slot.serve(request.version, cert)
        asker = request.requested_by or request.requested_label
        slot.actor_label = f"approved request #{request.pk} of {asker}"
        slot.audit(Action.PROMOTED, request.version, request.reason)
    return PromotionOutcome("promoted", deployment, request, why)


def reject(request: PromotionRequest, approver: object, reason: str = "") -> PromotionOutcome:
    """Another member of the team turns a pending request down; nothing is served differently."""
    with transaction.atomic():
        request, slot = _lock_request(request, approver)
        problem = _decider_problem(request, approver, "reject")
        if problem:
            return slot.refuse(request.version, problem, request, forbidden=True)
        if request.status != RequestStatus.PENDING:
            why = f"request #{request.pk} is already {request.status}"
            return slot.refuse(request.version, why, request)
        _decide(request, RequestStatus.REJECTED, approver, reason)
        slot.audit(Action.REJECTED, request.version, reason)
    why = f"request #{request.pk} was rejected"
    return PromotionOutcome("rejected", slot.current, request, why)


# -- the pieces ------------------------------------------------------------------------------------


def _user(actor: object):
    """The actor as a user row to record, or None (a command, a schedule)."""
    return actor if getattr(actor, "is_authenticated", False) else None


@dataclass
class _Slot:
    """One (model, pool, stage) slot, locked for the rest of the transaction, and who acts on it.

    ``was`` is what served when the lock was taken: the audit events' previous version.
    """

    model: RegisteredModel
    pool: ServingPool
    stage: str
    current: Deployment | None
    was: ModelVersion | None
    user: object
    actor_label: str

    @classmethod
    def lock(
        cls, model: RegisteredModel, pool: ServingPool, stage: str, actor: object, label: str
    ) -> _Slot:
        # The model's row exists before the slot's first promotion does, so locking it also
        # keeps two first promotions from both inserting. A no-op on SQLite, where the
        # IMMEDIATE transaction already holds the database's write lock.
        list(RegisteredModel.objects.select_for_update().filter(pk=model.pk).values_list("pk"))
        current = (
            Deployment.objects.select_related("version", "previous_version")
            .filter(model=model, pool=pool, stage=stage)
            .first()
        )
        was = current.version if current else None
        return cls(model, pool, stage, current, was, _user(actor), label)

    def audit(self, action: str, version: ModelVersion | None, reason: str) -> AuditEvent:
        return AuditEvent.objects.create(
            team_id=self.model.team_id,
            model=self.model,
            pool=self.pool,
            stage=self.stage,
            action=action,
            version=version,
            previous_version=self.was,
            actor=self.user,
            actor_label=self.actor_label,
            reason=reason,
        )

    def refuse(
        self,
        version: ModelVersion | None,
        why: str,
        request: PromotionRequest | None = None,
        forbidden: bool = False,
    ) -> PromotionOutcome:
        self.audit(Action.REFUSED, version, why)
        return PromotionOutcome("refused", self.current, request, why, forbidden)

    def serve(self, version: ModelVersion, cert: Certification) -> Deployment:
        """Write the slot, supersede the requests pending on it, sync MLflow after commit."""
        now = timezone.now()
        deployment = self.current or Deployment(
            team_id=self.model.team_id, model=self.model, pool=self.pool, stage=self.stage
        )
        if deployment.pk is None:
            deployment.version = version
        elif deployment.version_id != version.pk:
            # The same version again keeps what it replaced, so a rollback still has a target.
            deployment.previous_version = deployment.version
            deployment.version = version
            deployment.generation += 1
        deployment.certification = cert
        deployment.updated_by = self.user
        deployment.updated_at = now
        deployment.save()
        self.current = deployment
        # A request still pending was asked against what served before this change.
        PromotionRequest.objects.filter(
            model=self.model, pool=self.pool, stage=self.stage, status=RequestStatus.PENDING
        ).update(status=RequestStatus.SUPERSEDED, decided_at=now)
        model_id = self.model.pk
        transaction.on_commit(lambda: sync_aliases(model_id))
        return deployment


def _lock_request(request: PromotionRequest, decider: object) -> tuple[PromotionRequest, _Slot]:
    """The request as it is now, and its slot locked: a decision is taken on fresh state."""
    model = request.model
    slot = _Slot.lock(model, request.pool, request.stage, decider, "")
    fresh = PromotionRequest.objects.select_related(
        "team", "model", "pool__profile", "version", "requested_by"
    ).get(pk=request.pk)
    return fresh, slot


def _decider_problem(request: PromotionRequest, user: object, verb: str) -> str:
    if not teams_for(user).filter(pk=request.team_id).exists():
        return f"only a member of {request.team} can {verb} request #{request.pk}"
    if request.requested_by_id is not None and request.requested_by_id == user.pk:  # type: ignore[attr-defined]
        return f"request #{request.pk} needs another member of the team to {verb} it"
    return ""


def _decide(request: PromotionRequest, status: str, user: object, reason: str) -> None:
    request.status = status
    request.decided_by = _user(user)
    request.decision_reason = reason
    request.decided_at = timezone.now()
    request.save(update_fields=["status", "decided_by", "decision_reason", "decided_at"])


# -- MLflow ----------------------------------------------------------------------------------------


def alias_for(pool: ServingPool, stage: str) -> str:
    return f"{stage}-{pool.name}"


def wanted_aliases(deployments: list[Deployment]) -> dict[str, ModelVersion]:
    """``<stage>-<pool>`` for every slot, and plain ``<stage>`` where one pool serves that stage.

    With two pools at a stage the plain alias would be ambiguous, so it is left out (and removed).
    """
    wanted = {alias_for(d.pool, d.stage): d.version for d in deployments}
    for stage in Stage.values:
        at_stage = [d for d in deployments if d.stage == stage]
        if len(at_stage) == 1:
            wanted[stage] = at_stage[0].version
    return wanted


def sync_aliases(model_id: int) -> None:
    """Point the model's MLflow aliases at what its pools serve; best effort.

    Every slot of the model is synced, not only the one that changed, so an alias missed while
    MLflow was down is set by the model's next promotion.
    """
    deployments = list(
        Deployment.objects.filter(model_id=model_id).select_related(
            "model__team", "pool", "version__model__team"
        )
    )
    if not deployments:
        return
    model = deployments[0].model
    name = model.mlflow_name or mlflow_name(model.team, model.name)
    wanted = wanted_aliases(deployments)
    numbers: dict[int, str] = {}  # a version serving two slots is mirrored once
    try:
        client = tracking.client()
        for alias, version in wanted.items():
            if version.pk not in numbers:
                numbers[version.pk] = version.mlflow_version or mirror_to_mlflow(version)
            number = numbers[version.pk]
            if not number:
                log.warning(
                    "MLflow alias %s of %s not set: %s is not in MLflow", alias, name, version
                )
                continue
            client.set_registered_model_alias(name, alias, number)
        existing = client.get_registered_model(name).aliases
        for stage in Stage.values:
            if stage in existing and stage not in wanted:
                client.delete_registered_model_alias(name, stage)
    except Exception as exc:  # noqa: BLE001 - the tracking store is optional for serving
        log.warning(
            "could not set the MLflow aliases of %s (retried next promotion): %s", name, exc
        )
