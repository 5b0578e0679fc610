"""The promotion API: 201 promoted, 202 waiting for approval, 409 refused by the gate (audited),
rollback, deployments, requests and their decisions, the audit log; another team's ids 404."""

from __future__ import annotations

import pytest
from django.test import Client

from r1platform.accounts.models import ApiToken
from r1platform.deployments.models import AuditEvent, Deployment, PromotionRequest, ServingPool
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


def post(client, url: str, body: dict):
    return client.post(url, body, content_type="application/json")


def promote(client, version, pool="cpu-a", stage="production", **body):
    url = f"/api/v1/models/{version.model_id}/promote"
    return post(client, url, {"version_id": version.pk, "pool": pool, "stage": stage, **body})


@pytest.fixture
def carol_api(carol, team):
    _, raw = ApiToken.issue(carol, team, name="carol-ci")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


@pytest.fixture
def outsider_api(outsider_token):
    return Client(HTTP_AUTHORIZATION=f"Bearer {outsider_token}")


def test_an_uncertified_version_is_409_with_the_reason_and_audited(api, version, pool, user):
    response = promote(api, version, reason="ship it")

    assert response.status_code == 409
    assert "no passed certification" in response.json()["detail"]
    assert not Deployment.objects.exists()
    event = AuditEvent.objects.get()
    assert (event.action, event.actor, event.version) == ("refused", user, version)
    assert event.actor_label.startswith("token ")


def test_a_certificate_below_the_teams_level_is_409(api, version, pool, ort, team):
    certify(version, ort, level="basic")
    set_policy(team, level="scenario")

    response = promote(api, version)

    assert response.status_code == 409 and "below scenario" in response.json()["detail"]


def test_a_certified_version_is_promoted_and_listed(api, version, pool, ort, user):
    cert = certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)

    first = promote(api, version, reason="release 1")
    assert first.status_code == 201, first.content
    body = first.json()
    assert body["status"] == "promoted" and body["request"] is None
    deployment = body["deployment"]
    assert deployment["version"]["id"] == version.pk and deployment["previous_version"] is None
    assert deployment["generation"] == 1 and deployment["updated_by"] == "alice"
    assert deployment["certification"]["id"] == cert.pk
    assert deployment["certification"]["valid"] is True
    assert deployment["pool"] == "cpu-a" and deployment["profile"] == ort.key

    second = promote(api, v2)
    assert second.status_code == 201
    assert second.json()["deployment"]["previous_version"]["id"] == version.pk
    assert second.json()["deployment"]["generation"] == 2

    listed = api.get(f"/api/v1/models/{version.model_id}/deployments").json()
    assert [(d["pool"], d["stage"], d["version"]["number"]) for d in listed] == [
        ("cpu-a", "production", 2)
    ]
    assert listed[0]["previous_version"]["number"] == 1


def test_the_deployment_shows_when_its_certificate_stopped_holding(api, version, pool, ort):
    certify(version, ort)
    assert promote(api, version).status_code == 201
    rewrite(version)

    listed = api.get(f"/api/v1/models/{version.model_id}/deployments").json()

    cert = listed[0]["certification"]
    assert cert["valid"] is False and cert["state"] == "invalid"
    assert "stored file changed" in cert["reasons"][0]


def test_rollback_restores_the_previous_version(api, version, pool, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    promote(api, version)
    promote(api, v2)

    url = f"/api/v1/models/{version.model_id}/rollback"
    response = post(api, url, {"pool": "cpu-a", "reason": "errors went up"})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "rolled_back"
    assert body["deployment"]["version"]["id"] == version.pk
    assert body["deployment"]["previous_version"]["id"] == v2.pk
    assert body["deployment"]["generation"] == 3
    audit = api.get(f"/api/v1/models/{version.model_id}/audit").json()
    assert audit[0]["action"] == "rolled_back" and audit[0]["reason"] == "errors went up"
    assert audit[0]["version"]["id"] == version.pk and audit[0]["previous_version"]["id"] == v2.pk


def test_rollback_to_a_version_whose_certificate_broke_is_409(api, version, pool, ort):
    certify(version, ort)
    v2 = next_version(version)
    certify(v2, ort)
    promote(api, version)
    promote(api, v2)
    rewrite(version)

    response = post(api, f"/api/v1/models/{version.model_id}/rollback", {"pool": "cpu-a"})

    assert response.status_code == 409 and "no longer valid" in response.json()["detail"]
    assert Deployment.objects.get().version == v2


def test_approval_is_202_then_another_member_approves(api, carol_api, version, pool, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)

    asked = promote(api, version, reason="weekly release")

    assert asked.status_code == 202, asked.content
    request = asked.json()["request"]
    assert request["status"] == "pending" and request["requested_by"] == "alice"
    assert not Deployment.objects.exists()
    pending = api.get(f"/api/v1/models/{version.model_id}/promotions?status=pending").json()
    assert [r["id"] for r in pending] == [request["id"]]

    own = post(api, f"/api/v1/promotions/{request['id']}/approve", {})
    assert own.status_code == 403 and "another member" in own.json()["detail"]
    assert not Deployment.objects.exists()

    approved = post(carol_api, f"/api/v1/promotions/{request['id']}/approve", {"reason": "ok"})

    assert approved.status_code == 200, approved.content
    body = approved.json()
    assert body["status"] == "promoted" and body["request"]["status"] == "approved"
    assert body["request"]["decided_by"] == "carol"
    assert body["deployment"]["version"]["id"] == version.pk
    assert body["deployment"]["updated_by"] == "carol"
    actions = [e["action"] for e in api.get(f"/api/v1/models/{version.model_id}/audit").json()]
    assert actions == ["promoted", "approved", "refused", "requested"]

    again = post(carol_api, f"/api/v1/promotions/{request['id']}/approve", {})
    assert again.status_code == 409 and "already approved" in again.json()["detail"]


def test_a_rejected_request_is_not_served(api, carol_api, version, pool, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request_id = promote(api, version).json()["request"]["id"]

    own = post(api, f"/api/v1/promotions/{request_id}/reject", {})
    rejected = post(carol_api, f"/api/v1/promotions/{request_id}/reject", {"reason": "freeze"})

    assert own.status_code == 403
    assert rejected.status_code == 200, rejected.content
    assert rejected.json()["status"] == "rejected"
    assert rejected.json()["decision_reason"] == "freeze"
    assert PromotionRequest.objects.get().status == "rejected"
    assert not Deployment.objects.exists()


def test_an_unknown_pool_or_stage_is_refused(api, version, pool):
    unknown = promote(api, version, pool="nowhere")
    assert unknown.status_code == 400 and "cpu-a" in unknown.json()["detail"]
    assert promote(api, version, stage="canary").status_code == 422


def test_it_lists_the_pools(api, pool, ort):
    ServingPool.objects.create(name="cpu-b", profile=ort, max_batch_size=8)

    pools = api.get("/api/v1/pools").json()

    assert [p["name"] for p in pools] == ["cpu-a", "cpu-b"]
    assert pools[1]["profile"] == ort.key and pools[1]["max_batch_size"] == 8
    assert pools[0]["backend"] == "onnxruntime" and pools[0]["profile_label"]


def test_another_teams_token_gets_404_everywhere(api, outsider_api, version, pool, ort, team):
    certify(version, ort)
    set_policy(team, approval=True)
    request_id = promote(api, version).json()["request"]["id"]
    model = version.model_id

    answers = [
        promote(outsider_api, version),
        post(outsider_api, f"/api/v1/models/{model}/rollback", {"pool": "cpu-a"}),
        outsider_api.get(f"/api/v1/models/{model}/deployments"),
        outsider_api.get(f"/api/v1/models/{model}/promotions"),
        outsider_api.get(f"/api/v1/models/{model}/audit"),
        post(outsider_api, f"/api/v1/promotions/{request_id}/approve", {}),
        post(outsider_api, f"/api/v1/promotions/{request_id}/reject", {}),
    ]

    assert [a.status_code for a in answers] == [404] * len(answers)
    assert PromotionRequest.objects.get().status == "pending"
    assert not Deployment.objects.exists()


def test_a_version_of_another_team_is_404(api, version, outsider, other_team, pool, mlp_onnx):
    from r1platform.core.storage import spool_local_file
    from r1platform.registry.services import upload_model

    theirs = upload_model(
        team=other_team,
        user=outsider,
        name="theirs",
        task="classification",
        uploaded=spool_local_file(mlp_onnx),
    )

    url = f"/api/v1/models/{version.model_id}/promote"
    body = {"version_id": theirs.pk, "pool": "cpu-a", "stage": "production"}
    assert post(api, url, body).status_code == 404
    assert not AuditEvent.objects.exists(), "nothing of team B is named in team A's log"


def test_the_routes_need_a_token_and_are_in_the_openapi_document(api, db):
    anonymous = Client()
    assert anonymous.get("/api/v1/pools").status_code == 401
    assert anonymous.post("/api/v1/models/1/promote").status_code == 401
    paths = set(api.get("/api/v1/openapi.json").json()["paths"])
    assert {
        "/api/v1/pools",
        "/api/v1/models/{model_id}/promote",
        "/api/v1/models/{model_id}/rollback",
        "/api/v1/models/{model_id}/deployments",
        "/api/v1/models/{model_id}/promotions",
        "/api/v1/models/{model_id}/audit",
        "/api/v1/promotions/{request_id}/approve",
        "/api/v1/promotions/{request_id}/reject",
    } <= paths
