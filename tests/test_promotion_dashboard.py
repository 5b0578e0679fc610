"""The deployments section of the model page, its actions (promote, roll back, approve, reject),
the audit log page, the admin (which cannot go around the gate) and the management commands."""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from r1platform.deployments import services
from r1platform.deployments.models import (
    AuditEvent,
    Deployment,
    PromotionPolicy,
    PromotionRequest,
    ServingPool,
)
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

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def carol_client(carol):
    client = Client()
    client.force_login(carol)
    return client


def form(version, pool="", stage="production", reason="") -> dict:
    chosen = pool or ServingPool.objects.get(name="cpu-a").pk
    return {"version": version.pk, "pool": chosen, "stage": stage, "reason": reason}


def promote_url(version) -> str:
    return reverse("deployments:promote", args=[version.model_id])


# -- the section on the model page -----------------------------------------------------------------


def test_the_model_page_shows_every_pool_and_stage_with_the_promote_form(
    member_client, version, pool, ort
):
    certify(version, ort)
    member_client.post(promote_url(version), form(version))

    page = member_client.get(version.model.get_absolute_url()).content.decode()

    assert 'data-testid="deployments"' in page and 'data-testid="promote-form"' in page
    assert 'data-testid="matrix-link"' in page, "the certification matrix link stays"
    assert 'data-pool="cpu-a" data-stage="production" data-version="1"' in page
    assert 'data-pool="cpu-a" data-stage="staging" data-version=""' in page
    assert ort.label in page and "nothing served" in page
    assert reverse("deployments:audit", args=[version.model_id]) in page


def test_without_pools_the_section_says_how_to_make_one(member_client, version):
    page = member_client.get(version.model.get_absolute_url()).content.decode()

    assert 'data-testid="no-pools"' in page and "create_pool" in page
    assert 'data-testid="promote-form"' not in page


def test_promote_with_htmx_answers_the_section_with_the_outcome(member_client, version, pool, ort):
    certify(version, ort)

    response = member_client.post(promote_url(version), form(version, reason="go"), **HTMX)

    page = response.content.decode()
    assert response.status_code == 200
    assert 'id="deployments"' in page
    assert "<html" not in page, "only the section"
    assert "Promoted: v1 now serves production on cpu-a." in page
    assert 'data-pool="cpu-a" data-stage="production" data-version="1"' in page
    deployment = Deployment.objects.get()
    assert deployment.version == version and deployment.updated_by.username == "alice"
    assert AuditEvent.objects.get().reason == "go"


def test_a_refused_promotion_shows_the_gates_reason(member_client, version, pool):
    response = member_client.post(promote_url(version), form(version), **HTMX)

    page = response.content.decode()
    assert "Refused:" in page and "no passed certification" in page
    assert 'class="message message-error"' in page
    assert not Deployment.objects.exists()
    assert AuditEvent.objects.get().action == "refused"


def test_a_refused_promotion_keeps_what_was_chosen(member_client, version, pool):
    # Production, not the form's initial staging: kept, not reset.
    chosen = form(version, stage="production", reason="hotfix for ticket 42")
    page = member_client.post(promote_url(version), chosen, **HTMX).content.decode()

    assert "Refused:" in page
    promote = page.split('data-testid="promote-form"', 1)[1].split("</form>", 1)[0]
    assert "hotfix for ticket 42</textarea>" in promote
    assert re.search(r'<option value="production"[^>]*selected', promote), promote
    assert re.search(rf'<option value="{version.pk}"[^>]*selected', promote), promote


def test_without_htmx_the_outcome_is_a_message_on_the_model_page(member_client, version, pool):
    response = member_client.post(promote_url(version), form(version), follow=True)

    assert response.redirect_chain[-1][0].endswith("#deployments")
    assert "no passed certification" in response.content.decode()


def test_a_bad_form_is_400_with_what_is_wrong(member_client, version, pool):
    response = member_client.post(promote_url(version), {"stage": "canary"}, **HTMX)

    assert response.status_code == 400
    assert "Not promoted" in response.content.decode()
    assert not AuditEvent.objects.exists()


def test_the_rollback_button_restores_the_previous_version(member_client, version, pool, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    member_client.post(promote_url(version), form(version))
    page = member_client.post(promote_url(version), form(v2), **HTMX).content.decode()
    assert 'data-testid="rollback-button"' in page and "Roll back to v1" in page

    url = reverse("deployments:rollback", args=[version.model_id])
    response = member_client.post(url, {"pool": "cpu-a", "stage": "production"}, **HTMX)

    assert "Rolled back: v1 now serves production on cpu-a." in response.content.decode()
    assert Deployment.objects.get().version == version


def test_pending_requests_offer_approve_only_to_other_members(
    member_client, carol_client, version, pool, ort, team
):
    certify(version, ort)
    set_policy(team, approval=True)
    asked = member_client.post(promote_url(version), form(version), **HTMX).content.decode()
    assert "waits for another member" in asked
    request = PromotionRequest.objects.get()

    own_page = member_client.get(version.model.get_absolute_url()).content.decode()
    carols_page = carol_client.get(version.model.get_absolute_url()).content.decode()

    assert 'data-testid="pending-request"' in own_page
    assert 'data-testid="approve-button"' not in own_page
    assert 'data-testid="approve-button"' in carols_page
    own = member_client.post(reverse("deployments:approve", args=[request.pk]), **HTMX)
    assert "another member" in own.content.decode() and not Deployment.objects.exists()

    approved = carol_client.post(reverse("deployments:approve", args=[request.pk]), **HTMX)

    assert "Promoted: v1 now serves production on cpu-a." in approved.content.decode()
    assert Deployment.objects.get().updated_by.username == "carol"


def test_reject_leaves_nothing_served(member_client, carol_client, version, pool, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    member_client.post(promote_url(version), form(version))
    request = PromotionRequest.objects.get()

    response = carol_client.post(
        reverse("deployments:reject", args=[request.pk]), {"reason": "freeze"}, **HTMX
    )

    request.refresh_from_db()
    assert "was rejected" in response.content.decode()
    assert (request.status, request.decision_reason) == ("rejected", "freeze")
    assert not Deployment.objects.exists()


def test_the_audit_page_lists_who_did_what_and_why(member_client, version, pool, ort):
    member_client.post(promote_url(version), form(version))
    certify(version, ort)
    member_client.post(promote_url(version), form(version, reason="certified now"))

    page = member_client.get(reverse("deployments:audit", args=[version.model_id]))

    html = page.content.decode()
    assert html.count('data-testid="audit-event"') == 2
    assert 'data-action="promoted"' in html and 'data-action="refused"' in html
    assert "certified now" in html and "alice" in html
    only = member_client.get(
        reverse("deployments:audit", args=[version.model_id]), {"action": "refused"}
    )
    assert only.content.decode().count('data-testid="audit-event"') == 1


def test_another_team_gets_404(client, outsider, version, pool, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request = services.promote(
        model=version.model, version=version, pool=pool, stage="staging", actor=version.created_by
    ).request
    client.force_login(outsider)
    model = version.model_id

    answers = [
        client.get(reverse("deployments:model", args=[model])),
        client.get(reverse("deployments:audit", args=[model])),
        client.post(reverse("deployments:promote", args=[model]), form(version)),
        client.post(reverse("deployments:rollback", args=[model]), {"pool": "cpu-a"}),
        client.post(reverse("deployments:approve", args=[request.pk])),
        client.post(reverse("deployments:reject", args=[request.pk])),
    ]

    assert [a.status_code for a in answers] == [404] * len(answers)
    assert PromotionRequest.objects.get().status == "pending"


def test_every_post_needs_the_csrf_token(user, version, pool, ort):
    certify(version, ort)
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)

    refused = strict.post(promote_url(version), form(version))
    assert refused.status_code == 403 and not Deployment.objects.exists()

    page = strict.get(version.model.get_absolute_url())
    token = page.cookies[settings.CSRF_COOKIE_NAME].value
    accepted = strict.post(promote_url(version), form(version), HTTP_X_CSRFTOKEN=token, **HTMX)
    assert accepted.status_code == 200 and Deployment.objects.get().version == version


# -- the admin -------------------------------------------------------------------------------------


def test_the_admin_cannot_edit_add_or_delete_a_deployment(admin_client, version, pool, ort):
    certify(version, ort)
    v2 = next_version(version)  # not certified
    services.promote(
        model=version.model, version=version, pool=pool, stage="production", actor=None
    )
    deployment = Deployment.objects.get()
    change = reverse("admin:deployments_deployment_change", args=[deployment.pk])

    assert admin_client.get(change).status_code == 200, "it can be read"
    edit = admin_client.post(
        change,
        {"version": v2.pk, "stage": "production", "pool": pool.pk, "generation": 9},
    )
    add = admin_client.post(reverse("admin:deployments_deployment_add"), {"version": v2.pk})
    delete = admin_client.post(
        reverse("admin:deployments_deployment_delete", args=[deployment.pk]), {"post": "yes"}
    )

    assert (edit.status_code, add.status_code, delete.status_code) == (403, 403, 403)
    deployment.refresh_from_db()
    assert (deployment.version, deployment.generation) == (version, 1)


def test_the_admin_promotes_only_through_the_gate(admin_client, version, pool, ort):
    url = reverse("admin:deployments_deployment_promote")
    body = {"version": version.pk, "pool": pool.pk, "stage": "production", "reason": "hotfix"}

    refused = admin_client.post(url, body)

    assert refused.status_code == 200 and "no passed certification" in refused.content.decode()
    assert not Deployment.objects.exists()
    event = AuditEvent.objects.get()
    assert (event.action, event.actor_label, event.actor.username) == ("refused", "admin", "admin")

    certify(version, ort)
    promoted = admin_client.post(url, body)

    assert promoted.status_code == 302
    assert Deployment.objects.get().version == version
    assert AuditEvent.objects.latest("pk").action == "promoted"


def test_the_admin_rollback_action_goes_through_the_gate(admin_client, version, pool, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    for v in (version, v2):
        services.promote(model=v.model, version=v, pool=pool, stage="production", actor=None)
    rewrite(version)
    deployment = Deployment.objects.get()

    admin_client.post(
        reverse("admin:deployments_deployment_changelist"),
        {"action": "roll_back", "_selected_action": [deployment.pk]},
    )

    deployment.refresh_from_db()
    assert deployment.version == v2, "the previous version's certificate no longer holds"
    event = AuditEvent.objects.latest("pk")
    assert (event.action, event.actor_label) == ("refused", "admin")


def test_the_admin_edits_pools_and_policies(admin_client, ort, team):
    response = admin_client.post(
        reverse("admin:deployments_servingpool_add"),
        {
            "name": "cpu-z",
            "profile": ort.pk,
            "description": "",
            "max_queue_delay_ms": 2.5,
            "max_batch_size": 16,
            "url": "http://127.0.0.1:8100",
            "text_engine": "builtin",
            "engine_replicas": 1,
            "created_at_0": "2026-11-22",
            "created_at_1": "08:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    pool = ServingPool.objects.get(name="cpu-z")
    assert (pool.max_batch_size, pool.url) == (16, "http://127.0.0.1:8100")

    response = admin_client.post(
        reverse("admin:deployments_promotionpolicy_add"),
        {"team": team.pk, "required_level": "performance", "require_approval": "on"},
    )
    assert response.status_code == 302
    policy = PromotionPolicy.objects.get(team=team)
    assert (policy.required_level, policy.require_approval) == ("performance", True)


# -- management commands ---------------------------------------------------------------------------


def test_create_pool_and_set_policy(ort, team, capsys):
    call_command("create_pool", "cpu-c", "--profile", ort.key, "--max-batch-size", "4")
    call_command("set_policy", team.slug, "--level", "scenario", "--approval")

    pool = ServingPool.objects.get(name="cpu-c")
    assert (pool.profile, pool.max_batch_size, pool.max_queue_delay_ms) == (ort, 4, 5.0)
    policy = PromotionPolicy.objects.get(team=team)
    assert (policy.required_level, policy.require_approval) == ("scenario", True)
    call_command("set_policy", team.slug, "--no-approval")
    policy.refresh_from_db()
    assert (policy.required_level, policy.require_approval) == ("scenario", False)
    with pytest.raises(CommandError, match="no hardware profile"):
        call_command("create_pool", "cpu-d", "--profile", "nowhere")


def test_the_promote_command_goes_through_the_gate(version, pool, ort, team):
    args = [team.slug, "mlp", "1", "--pool", "cpu-a", "--stage", "production"]
    with pytest.raises(CommandError, match="refused: .*no passed certification"):
        call_command("promote", *args, "--label", "schedule nightly")
    assert AuditEvent.objects.get().actor_label == "schedule nightly"

    certify(version, ort)
    call_command("promote", *args)

    assert Deployment.objects.get().version == version
