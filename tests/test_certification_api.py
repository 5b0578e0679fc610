"""The certification API: profiles, launching (refusals are 400 before anything is queued),
reading a certification and its reports, the certified-or-not question; another team's ids 404."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from django.test import Client

from r1platform.certification.document import CertificateDocument
from r1platform.certification.models import Certification
from r1platform.jobs.models import Job
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import report_worker, worker_stopped
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    finish,
    ort_fixture,
    profiles_fixture,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")


def post(api, body: dict):
    return api.post("/api/v1/certifications", body, content_type="application/json")


@pytest.fixture
def outsider_api(outsider_token):
    return Client(HTTP_AUTHORIZATION=f"Bearer {outsider_token}")


@pytest.fixture
def cert_id(api, version, ort) -> int:
    response = post(api, {"version_id": version.pk, "profile": ort.key, "level": "performance"})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_it_lists_profiles_and_whether_they_are_served(api, profiles):
    gone = replace(profiles["onnxruntime"].as_pipeline(), device_name="Old CPU")
    report_worker("old@host", ["cpu"], [gone])
    worker_stopped("old@host")

    found = {p["key"]: p for p in api.get("/api/v1/profiles").json()}

    ort = found[profiles["onnxruntime"].key]
    assert ort["served"] is True and ort["backend"] == "onnxruntime"
    assert ort["device_kind"] == "cpu" and ort["isa"] == profiles["onnxruntime"].isa
    assert ort["backend_version"] and ort["total_memory_mb"] > 0 and ort["last_seen"]
    assert found[gone.key]["served"] is False
    served = [p["key"] for p in api.get("/api/v1/profiles", {"served": "true"}).json()]
    assert gone.key not in served and ort["key"] in served


def test_it_queues_a_certification(api, version, ort, cert_id):
    body = api.get(f"/api/v1/certifications/{cert_id}").json()
    assert body["status"] == "pending" and body["verdict"] is None
    assert body["profile"] == ort.key and body["level"] == "performance"
    assert body["validity"] == {
        "valid": False,
        "state": "pending",
        "reasons": [body["validity"]["reasons"][0]],
    }
    assert body["reports"] == {} and body["checks"] == []
    job = Job.objects.get(pk=body["job_id"])
    assert job.queue == "profile." + ort.key


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"profile": "onnxruntime-cpu-nowhere-1"}, "no worker has reported"),
        ({"level": "scenario"}, "scenario level needs"),
        ({"thresholds": {"p99_budget_ms": 0}}, "greater than 0"),
        ({"thresholds": {"colour": "red"}}, "unknown threshold"),
        ({"golden_dataset_id": 999}, "does not exist in this team"),
    ],
)
def test_it_refuses_with_a_message_before_queueing(api, version, ort, body, message):
    response = post(api, {"version_id": version.pk, "profile": ort.key, **body})
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert not Job.objects.exists() and not Certification.objects.exists()


def test_it_refuses_a_format_the_profile_cannot_run(api, version, profiles):
    response = post(api, {"version_id": version.pk, "profile": profiles["torch"].key})
    assert response.status_code == 400 and "runs on onnxruntime" in response.json()["detail"]


def test_the_same_idempotency_key_returns_the_first_certification(api, version, ort):
    body = {"version_id": version.pk, "profile": ort.key, "idempotency_key": "ci-42"}
    first = post(api, body)
    again = post(api, body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    conflict = post(api, {**body, "level": "performance"})
    assert conflict.status_code == 409
    assert Certification.objects.count() == 1


def test_it_reads_a_finished_certification_with_its_checks_and_reports(api, cert_id):
    cert = finish(Certification.objects.get(pk=cert_id))

    body = api.get(f"/api/v1/certifications/{cert_id}").json()

    assert body["status"] == "passed" and body["verdict"] == "passed"
    assert body["validity"] == {"valid": True, "state": "valid", "reasons": []}
    assert body["engine_sha256"] == cert.version.sha256 and body["suite_version"] == "2.0.0"
    parity = next(c for c in body["checks"] if c["id"] == "parity")
    measured = {m["name"]: m for m in parity["measurements"]}
    assert measured["logits.max_abs_error"]["threshold"] == 0.01
    assert measured["logits.max_abs_error"]["comparison"] == "<="
    assert body["thresholds"]["p99_budget_ms"] == 500.0
    assert set(body["reports"]) == {"html", "pdf", "json"}

    for kind, content_type in (("html", "text/html"), ("pdf", "application/pdf")):
        response = api.get(body["reports"][kind])
        assert response.status_code == 200 and response["Content-Type"].startswith(content_type)
        assert f'filename="certificate-{cert_id}-mlp-v1.{kind}"' in response["Content-Disposition"]
    assert api.get(body["reports"]["pdf"]).content.startswith(b"%PDF")
    document = api.get(f"/api/v1/certifications/{cert_id}/report.json")
    assert document["Content-Type"] == "application/json"
    parsed = CertificateDocument.model_validate(json.loads(document.content))
    assert parsed.certificate_id == cert_id and parsed.verdict == "passed"


def test_the_reports_are_404_until_the_suite_finished(api, cert_id):
    for kind in ("html", "pdf", "json"):
        response = api.get(f"/api/v1/certifications/{cert_id}/report.{kind}")
        assert response.status_code == 404
        assert "no " + kind in response.json()["detail"]


def test_it_lists_the_teams_certifications(api, outsider_api, version, cert_id):
    mine = api.get("/api/v1/certifications", {"version_id": version.pk}).json()
    assert [c["id"] for c in mine] == [cert_id]
    assert api.get("/api/v1/certifications", {"status": "passed"}).json() == []
    assert outsider_api.get("/api/v1/certifications").json() == []


def test_it_answers_whether_a_version_is_certified(api, version, ort, cert_id):
    url = f"/api/v1/versions/{version.pk}/certified"
    before = api.get(url, {"level": "basic", "profile": ort.key}).json()
    assert before["certified"] is False and before["certification_id"] is None
    assert "no passed certification" in before["reason"]

    finish(Certification.objects.get(pk=cert_id))

    basic = api.get(url, {"level": "basic", "profile": ort.key}).json()
    assert basic["certified"] is True and basic["certification_id"] == cert_id
    scenario = api.get(url, {"level": "scenario", "profile": ort.key}).json()
    assert scenario["certified"] is False and "below scenario" in scenario["reason"]
    assert api.get(url, {"level": "basic"}).status_code == 422  # the profile is required


def test_another_teams_ids_are_404(outsider_api, version, ort, cert_id):
    finish(Certification.objects.get(pk=cert_id))
    for url in (
        f"/api/v1/certifications/{cert_id}",
        f"/api/v1/certifications/{cert_id}/report.html",
        f"/api/v1/certifications/{cert_id}/report.pdf",
        f"/api/v1/certifications/{cert_id}/report.json",
        f"/api/v1/versions/{version.pk}/certified?profile={ort.key}",
    ):
        assert outsider_api.get(url).status_code == 404, url
    response = post(outsider_api, {"version_id": version.pk, "profile": ort.key})
    assert response.status_code == 404
    assert Certification.objects.count() == 1


def test_it_needs_a_token(client, db):
    assert client.get("/api/v1/profiles").status_code == 401
    assert (
        client.post("/api/v1/certifications", {}, content_type="application/json").status_code
        == 401
    )


def test_the_openapi_document_lists_the_certification_routes(api):
    paths = set(api.get("/api/v1/openapi.json").json()["paths"])
    assert {
        "/api/v1/profiles",
        "/api/v1/certifications",
        "/api/v1/certifications/{certification_id}",
        "/api/v1/certifications/{certification_id}/report.html",
        "/api/v1/certifications/{certification_id}/report.pdf",
        "/api/v1/certifications/{certification_id}/report.json",
        "/api/v1/versions/{version_id}/certified",
    } <= paths


def test_profiles_rows_outlive_their_workers(api, profiles):
    worker_stopped(WORKER)
    listed = api.get("/api/v1/profiles").json()
    assert {p["key"] for p in listed} == set(HardwareProfile.objects.values_list("key", flat=True))
    assert not any(p["served"] for p in listed)
