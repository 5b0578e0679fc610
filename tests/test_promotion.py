"""Promotion services: the certification gate, rollback, approval, the audit log, MLflow aliases,
and two promotions of one model at once leaving exactly one version served."""

from __future__ import annotations

import logging
import threading
import uuid

import pytest
from django.db import connection

from r1platform.core import tracking
from r1platform.deployments import services
from r1platform.deployments.models import (
    Action,
    AuditEvent,
    Deployment,
    PromotionRequest,
    RequestStatus,
    ServingPool,
)
from r1platform.registry.models import ModelVersion, RegisteredModel
from tests.promotion_data import (  # noqa: F401 - fixtures, registered by name
    carol_fixture,
    certify,
    certify_stage_fixture,
    next_version,
    ort_fixture,
    pool_fixture,
    profiles_fixture,
    rewrite,
    set_policy,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")


def promote(version: ModelVersion, pool: ServingPool, actor, stage="production", **kwargs):
    return services.promote(
        model=version.model, version=version, pool=pool, stage=stage, actor=actor, **kwargs
    )


def actions(model) -> list[str]:
    return list(
        AuditEvent.objects.filter(model=model).order_by("pk").values_list("action", flat=True)
    )


# -- the gate --------------------------------------------------------------------------------------


def test_an_uncertified_version_is_refused_and_the_refusal_audited(version, pool, user):
    outcome = promote(version, pool, user, reason="ship it")

    assert outcome.status == "refused" and outcome.deployment is None
    assert "no passed certification" in outcome.reason and pool.profile.key in outcome.reason
    assert not Deployment.objects.exists()
    event = AuditEvent.objects.get()
    assert (event.action, event.actor, event.version) == (Action.REFUSED, user, version)
    assert event.pool == pool and event.stage == "production"
    assert "no passed certification" in event.reason


def test_a_certificate_below_the_teams_level_is_refused(version, pool, user, ort, team):
    certify(version, ort, level="basic")
    set_policy(team, level="performance")

    outcome = promote(version, pool, user)

    assert outcome.refused and "at basic, below performance" in outcome.reason
    assert not Deployment.objects.exists()
    assert actions(version.model) == [Action.REFUSED]


def test_a_higher_certificate_satisfies_a_lower_requirement(version, pool, user, ort, team):
    certify(version, ort, level="performance")
    set_policy(team, level="basic")

    assert promote(version, pool, user).status == "promoted"


def test_a_certificate_for_another_profile_is_not_enough(version, user, ort, profiles):
    certify(version, ort)
    torch_pool = ServingPool.objects.create(name="torch-a", profile=profiles["torch"])

    outcome = promote(version, torch_pool, user)

    assert outcome.refused and "cannot run" in outcome.reason and "torch" in outcome.reason
    assert not Deployment.objects.exists()


def test_a_version_of_another_model_is_refused(version, pool, user, ort, team, mlp_onnx):
    from r1platform.core.storage import spool_local_file
    from r1platform.registry.services import upload_model

    other = upload_model(
        team=team,
        user=user,
        name="other",
        task="classification",
        uploaded=spool_local_file(mlp_onnx),
    )
    certify(other, ort)

    outcome = services.promote(
        model=version.model, version=other, pool=pool, stage="production", actor=user
    )

    assert outcome.refused and "is not a version of mlp" in outcome.reason
    assert not Deployment.objects.exists()


def test_an_unknown_stage_is_a_programming_error(version, pool, user):
    with pytest.raises(ValueError):
        promote(version, pool, user, stage="canary")


# -- promotion and rollback ------------------------------------------------------------------------


def test_promotions_bump_the_generation_and_keep_the_previous_version(version, pool, user, ort):
    cert1 = certify(version, ort)
    v2 = next_version(version)
    cert2 = certify(v2, ort)

    first = promote(version, pool, user, reason="first release")
    assert first.status == "promoted"
    slot = Deployment.objects.get()
    assert (slot.version, slot.previous_version, slot.generation) == (version, None, 1)
    assert slot.certification == cert1 and slot.updated_by == user and slot.team == version.team

    second = promote(v2, pool, user, reason="better")
    slot.refresh_from_db()
    assert second.status == "promoted" and second.deployment.pk == slot.pk
    assert (slot.version, slot.previous_version, slot.generation) == (v2, version, 2)
    assert slot.certification == cert2

    events = list(AuditEvent.objects.order_by("pk"))
    assert [(e.action, e.version, e.previous_version) for e in events] == [
        (Action.PROMOTED, version, None),
        (Action.PROMOTED, v2, version),
    ]
    assert [e.reason for e in events] == ["first release", "better"]
    assert all(e.actor == user and e.created_at for e in events)


def test_staging_and_production_are_separate_slots(version, pool, user, ort):
    certify(version, ort)
    promote(version, pool, user, stage="staging")
    promote(version, pool, user, stage="production")

    assert sorted(Deployment.objects.values_list("stage", flat=True)) == ["production", "staging"]


def test_promoting_the_served_version_again_keeps_the_rollback_target(version, pool, user, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    promote(version, pool, user)
    promote(v2, pool, user)

    again = promote(v2, pool, user)

    slot = Deployment.objects.get()
    assert again.status == "promoted"
    assert (slot.version, slot.previous_version, slot.generation) == (v2, version, 2)


def test_rollback_serves_the_previous_version_in_one_action(version, pool, user, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    promote(version, pool, user)
    promote(v2, pool, user)

    outcome = services.rollback(
        model=version.model, pool=pool, actor=user, reason="v2 answers slowly"
    )

    slot = Deployment.objects.get()
    assert outcome.status == "rolled_back"
    assert (slot.version, slot.previous_version, slot.generation) == (version, v2, 3)
    event = AuditEvent.objects.latest("pk")
    assert (event.action, event.version, event.previous_version) == (
        Action.ROLLED_BACK,
        version,
        v2,
    )
    assert event.reason == "v2 answers slowly" and event.actor == user


def test_rollback_refuses_a_previous_version_whose_certificate_no_longer_holds(
    version, pool, user, ort
):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    promote(version, pool, user)
    promote(v2, pool, user)
    rewrite(version)

    outcome = services.rollback(model=version.model, pool=pool, actor=user)

    slot = Deployment.objects.get()
    assert outcome.refused and "stored file changed" in outcome.reason
    assert (slot.version, slot.generation) == (v2, 2)
    event = AuditEvent.objects.latest("pk")
    assert (event.action, event.version) == (Action.REFUSED, version)


def test_rollback_without_a_previous_version_is_refused(version, pool, user, ort):
    certify(version, ort)
    assert services.rollback(model=version.model, pool=pool, actor=user).refused
    promote(version, pool, user)

    outcome = services.rollback(model=version.model, pool=pool, actor=user)

    assert outcome.refused and "no previous production version" in outcome.reason
    assert Deployment.objects.get().generation == 1
    assert actions(version.model) == [Action.REFUSED, Action.PROMOTED, Action.REFUSED]


# -- approval --------------------------------------------------------------------------------------


def test_with_approval_a_promotion_waits_for_another_member(version, pool, user, carol, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)

    asked = promote(version, pool, user, reason="release 1")

    assert asked.status == "pending" and asked.request is not None
    assert not Deployment.objects.exists()
    request = asked.request
    assert (request.status, request.requested_by, request.reason) == ("pending", user, "release 1")

    own = services.approve(request, user)
    request.refresh_from_db()
    assert own.refused and own.forbidden and "another member" in own.reason
    assert request.status == RequestStatus.PENDING and not Deployment.objects.exists()

    approved = services.approve(request, carol, reason="looked at the report")

    request.refresh_from_db()
    slot = Deployment.objects.get()
    assert approved.status == "promoted" and approved.deployment == slot
    assert (request.status, request.decided_by) == (RequestStatus.APPROVED, carol)
    assert request.decision_reason == "looked at the report" and request.decided_at
    assert slot.version == version and slot.updated_by == carol
    assert actions(version.model) == [
        Action.REQUESTED,
        Action.REFUSED,
        Action.APPROVED,
        Action.PROMOTED,
    ]
    promoted = AuditEvent.objects.latest("pk")
    assert promoted.actor == carol and f"request #{request.pk}" in promoted.actor_label
    assert promoted.reason == "release 1"


def test_an_uncertified_request_is_refused_before_anyone_is_asked(version, pool, user, team):
    set_policy(team, approval=True)

    outcome = promote(version, pool, user)

    assert outcome.refused and not PromotionRequest.objects.exists()


def test_approval_asks_the_gate_again(version, pool, user, carol, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request = promote(version, pool, user).request
    rewrite(version)

    outcome = services.approve(request, carol)

    request.refresh_from_db()
    assert outcome.refused and not outcome.forbidden and "stored file changed" in outcome.reason
    assert request.status == RequestStatus.REFUSED and request.decided_by == carol
    assert not Deployment.objects.exists()
    assert actions(version.model)[-1] == Action.REFUSED


def test_a_rejected_request_serves_nothing(version, pool, user, carol, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request = promote(version, pool, user).request

    outcome = services.reject(request, carol, reason="not this week")

    request.refresh_from_db()
    assert outcome.status == "rejected"
    assert (request.status, request.decision_reason) == (RequestStatus.REJECTED, "not this week")
    assert not Deployment.objects.exists()
    assert services.approve(request, carol).refused, "a decided request cannot be approved"
    assert actions(version.model) == [Action.REQUESTED, Action.REJECTED, Action.REFUSED]


def test_a_non_member_cannot_decide(version, pool, user, outsider, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request = promote(version, pool, user).request

    outcome = services.approve(request, outsider)

    assert outcome.refused and outcome.forbidden and "only a member" in outcome.reason
    request.refresh_from_db()
    assert request.status == RequestStatus.PENDING


def test_a_change_of_the_slot_supersedes_the_requests_still_pending(
    version, pool, user, carol, ort, team
):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    set_policy(team, approval=True)
    first = promote(version, pool, user).request
    second = promote(v2, pool, user).request

    services.approve(second, carol)

    first.refresh_from_db()
    assert first.status == RequestStatus.SUPERSEDED
    assert services.approve(first, carol).refused
    assert Deployment.objects.get().version == v2


# -- MLflow ----------------------------------------------------------------------------------------


@pytest.fixture
def own_mlflow_name(version):
    """The model under a registered-model name of its own in the session's MLflow store, so
    neither earlier tests' versions nor later tests' expectations meet this test's."""
    name = f"team-a.mlp-{uuid.uuid4().hex[:8]}"
    RegisteredModel.objects.filter(pk=version.model_id).update(mlflow_name=name)
    version.model.mlflow_name = name
    return name


def alias_version(model, alias: str) -> str:
    return str(tracking.client().get_model_version_by_alias(model.mlflow_name, alias).version)


def test_the_mlflow_aliases_follow_what_each_pool_serves(
    version, pool, user, ort, own_mlflow_name, django_capture_on_commit_callbacks
):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    model = version.model

    with django_capture_on_commit_callbacks(execute=True):
        promote(version, pool, user)
    version.refresh_from_db()
    assert version.mlflow_version, "the version was mirrored to MLflow on its first promotion"
    assert alias_version(model, "production-cpu-a") == version.mlflow_version
    assert alias_version(model, "production") == version.mlflow_version

    with django_capture_on_commit_callbacks(execute=True):
        promote(v2, pool, user, stage="staging")
        promote(v2, pool, user)
    v2.refresh_from_db()
    assert alias_version(model, "production-cpu-a") == v2.mlflow_version
    assert alias_version(model, "staging-cpu-a") == v2.mlflow_version
    assert alias_version(model, "production") == v2.mlflow_version

    # A second pool serving production makes the plain alias ambiguous: it is removed.
    other = ServingPool.objects.create(name="cpu-b", profile=ort)
    with django_capture_on_commit_callbacks(execute=True):
        promote(version, other, user)
    registered = tracking.client().get_registered_model(model.mlflow_name)
    aliases = {alias: str(number) for alias, number in registered.aliases.items()}
    assert aliases["production-cpu-b"] == version.mlflow_version
    assert aliases["production-cpu-a"] == v2.mlflow_version
    assert "production" not in aliases and aliases["staging"] == v2.mlflow_version

    with django_capture_on_commit_callbacks(execute=True):
        services.rollback(model=model, pool=pool, actor=user)
    assert alias_version(model, "production-cpu-a") == version.mlflow_version


def test_mlflow_down_never_blocks_a_promotion_and_the_next_one_sets_the_aliases(
    version,
    pool,
    user,
    ort,
    own_mlflow_name,
    monkeypatch,
    caplog,
    django_capture_on_commit_callbacks,
):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    model = version.model

    def down():
        raise ConnectionError("the tracking server is down")

    with monkeypatch.context() as patched:
        patched.setattr(tracking, "client", down)
        with caplog.at_level(logging.WARNING), django_capture_on_commit_callbacks(execute=True):
            outcome = promote(version, pool, user, stage="staging")
    assert outcome.status == "promoted" and Deployment.objects.get().version == version
    assert "could not set the MLflow aliases" in caplog.text and "down" in caplog.text

    with django_capture_on_commit_callbacks(execute=True):
        promote(v2, pool, user)
    version.refresh_from_db()
    v2.refresh_from_db()
    assert alias_version(model, "staging-cpu-a") == version.mlflow_version, "retried"
    assert alias_version(model, "production-cpu-a") == v2.mlflow_version


# -- two promotions at once ------------------------------------------------------------------------


@pytest.mark.parametrize("served_before", [False, True], ids=["empty-slot", "served-slot"])
def test_promotions_at_once_leave_exactly_one_version_and_a_consistent_history(
    transactional_db, version, pool, user, ort, monkeypatch, served_before
):
    certify(version, ort)
    contenders = []
    for _ in range(3):
        contenders.append(next_version(contenders[-1] if contenders else version))
        certify(contenders[-1], ort)
    synced: list[int] = []
    monkeypatch.setattr(services, "sync_aliases", synced.append)
    if served_before:
        promote(version, pool, user)
        synced.clear()
    # The gate reads the slot's certificate while the slot is locked; a slow gate widens the
    # window in which an unlocked promotion would read a slot another one is changing.
    real_gate = services.check_gate

    def slow_gate(*args):
        answer = real_gate(*args)
        threading.Event().wait(0.2)
        return answer

    monkeypatch.setattr(services, "check_gate", slow_gate)
    start = threading.Barrier(len(contenders))
    outcomes, errors = [], []

    def contend(candidate: ModelVersion) -> None:
        try:
            start.wait()
            outcomes.append(promote(candidate, pool, user))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=contend, args=(v,)) for v in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert errors == [] and [o.status for o in outcomes] == ["promoted"] * 3
    slot = Deployment.objects.get(model=version.model, pool=pool, stage="production")
    events = list(AuditEvent.objects.filter(action=Action.PROMOTED).order_by("pk"))
    history = [e.version_id for e in events]
    if served_before:
        assert history[0] == version.pk
        events = events[1:]
    # Each promotion replaced what the one before it left: no two read the same slot.
    assert sorted(e.version_id for e in events) == sorted(v.pk for v in contenders)
    assert events[0].previous_version_id == (version.pk if served_before else None)
    for before, after in zip(events, events[1:], strict=False):
        assert after.previous_version_id == before.version_id
    assert slot.version_id == events[-1].version_id
    assert slot.previous_version_id == events[-2].version_id
    assert slot.generation == len(history)
    assert synced == [version.model.pk] * 3, "MLflow is synced after each commit"
