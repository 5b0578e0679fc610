"""Certify everywhere: one action launches a certification on every live profile that can run
the version's format, skips the others with the reason, and refuses when nothing can run it; the
service, the API route and the version page's button."""

from __future__ import annotations

from dataclasses import replace

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from django.utils.html import escape

from pipelines.certification.profiles import compatibility_problem
from r1platform.certification import services
from r1platform.certification.models import Certification, CertStatus
from r1platform.jobs.models import Job
from r1platform.workers.models import HardwareProfile
from r1platform.workers.services import report_worker, worker_stopped
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    ort_fixture,
    profiles_fixture,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

EVERYWHERE = "/api/v1/certifications/everywhere"


@pytest.fixture
def second_ort(ort) -> HardwareProfile:
    """Another onnxruntime profile (other CPU), served by a second live worker."""
    other = replace(ort.as_pipeline(), device_name="Other CPU")
    report_worker("other@host", ["profile." + other.key], [other])
    return HardwareProfile.objects.get(key=other.key)


@pytest.fixture
def torch_profile(profiles) -> HardwareProfile:
    return profiles["torch"]


def why_not(profile: HardwareProfile, version) -> str:
    problem = compatibility_problem(profile.as_pipeline(), version.format, version.details)
    assert problem is not None
    return problem


def only_torch_is_served(torch_profile: HardwareProfile) -> None:
    """Every onnxruntime worker stops; a worker of the torch profile alone stays live."""
    worker_stopped(WORKER)
    worker_stopped("other@host")
    report_worker("torch@host", ["profile." + torch_profile.key], [torch_profile.as_pipeline()])


@pytest.fixture
def outsider_api(outsider_token):
    return Client(HTTP_AUTHORIZATION=f"Bearer {outsider_token}")


# -- the service -----------------------------------------------------------------------------------


def test_it_launches_on_every_live_profile_that_runs_the_format(
    version, user, ort, second_ort, torch_profile, enqueued, django_capture_on_commit_callbacks
):
    gone = replace(ort.as_pipeline(), device_name="Retired CPU")
    report_worker("retired@host", ["profile." + gone.key], [gone])
    worker_stopped("retired@host")

    with django_capture_on_commit_callbacks(execute=True):
        launched, skipped = services.launch_everywhere(
            version, "performance", user, thresholds={"p99_budget_ms": 40}
        )

    assert sorted(c.profile.key for c in launched) == sorted([ort.key, second_ort.key])
    assert skipped == [(torch_profile.key, why_not(torch_profile, version))]
    for cert in launched:
        assert cert.status == CertStatus.PENDING and cert.level == "performance"
        assert cert.settings["p99_budget_ms"] == 40 and cert.created_by == user
        assert cert.job.queue == "profile." + cert.profile.key
    assert sorted(enqueued) == sorted(c.job_id for c in launched)
    assert not Certification.objects.filter(profile__key=gone.key).exists()  # not live: ignored


def test_one_refused_profile_does_not_stop_the_others(
    version, user, ort, second_ort, torch_profile, monkeypatch
):
    # The second worker leaves between listing the live profiles and launching on its profile.
    gone = f"no live worker serves profile {second_ort.key}"
    monkeypatch.setattr(
        services, "serving_problem", lambda key: gone if key == second_ort.key else None
    )

    launched, skipped = services.launch_everywhere(version, "basic", user)

    assert [c.profile.key for c in launched] == [ort.key]
    assert dict(skipped) == {
        second_ort.key: gone,
        torch_profile.key: why_not(torch_profile, version),
    }
    assert Job.objects.count() == Certification.objects.count() == 1


def test_no_live_profile_that_runs_it_is_refused(version, user, ort, torch_profile):
    only_torch_is_served(torch_profile)

    with pytest.raises(services.CertificationRefused, match="no live worker serves a profile"):
        services.launch_everywhere(version, "basic", user)

    assert not Job.objects.exists() and not Certification.objects.exists()


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        ({"thresholds": {"colour": "red"}}, "unknown threshold"),
        ({"golden_dataset_id": 999}, "does not exist in this team"),
        ({"level": "scenario"}, "scenario level needs"),
    ],
)
def test_a_bad_setting_is_one_refusal_before_anything_is_queued(
    version, user, ort, second_ort, launch, message
):
    arguments = {"level": "basic", **launch}
    with pytest.raises(services.CertificationRefused, match=message):
        services.launch_everywhere(version, launched_by=user, **arguments)
    assert not Job.objects.exists() and not Certification.objects.exists()


def test_the_same_idempotency_key_gives_back_the_same_certifications(
    version, user, ort, second_ort
):
    first = services.launch_everywhere(version, "basic", user, idempotency_key="everywhere-1")
    again = services.launch_everywhere(version, "basic", user, idempotency_key="everywhere-1")

    assert [c.pk for c in again.launched] == [c.pk for c in first.launched]
    assert Certification.objects.count() == 2


# -- the API ---------------------------------------------------------------------------------------


def test_the_api_launches_everywhere_and_lists_the_skipped(
    api, version, ort, second_ort, torch_profile
):
    response = api.post(
        EVERYWHERE,
        {"version_id": version.pk, "level": "basic", "thresholds": {"p99_budget_ms": 25}},
        content_type="application/json",
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert sorted(c["profile"] for c in body["certifications"]) == sorted([ort.key, second_ort.key])
    single = api.get(f"/api/v1/certifications/{body['certifications'][0]['id']}").json()
    assert body["certifications"][0].keys() == single.keys()  # the single create's shape
    assert all(c["status"] == "pending" for c in body["certifications"])
    assert all(c["settings"]["p99_budget_ms"] == 25 for c in body["certifications"])
    assert body["skipped"] == [
        {"profile": torch_profile.key, "reason": why_not(torch_profile, version)}
    ]
    assert EVERYWHERE in api.get("/api/v1/openapi.json").json()["paths"]


def test_the_api_answers_400_when_no_profile_can_run_it(api, version, ort, torch_profile):
    only_torch_is_served(torch_profile)

    response = api.post(EVERYWHERE, {"version_id": version.pk}, content_type="application/json")

    assert response.status_code == 400
    assert "no live worker serves a profile" in response.json()["detail"]
    assert not Certification.objects.exists()


def test_the_api_answers_404_for_another_teams_version(outsider_api, version, ort, second_ort):
    response = outsider_api.post(
        EVERYWHERE, {"version_id": version.pk}, content_type="application/json"
    )
    assert response.status_code == 404
    assert not Certification.objects.exists()


# -- the dashboard ---------------------------------------------------------------------------------


def test_the_version_page_offers_the_button(member_client, version, ort, second_ort):
    page = member_client.get(version.get_absolute_url()).content.decode()

    start = page.rindex("<form", 0, page.index('data-testid="certify-everywhere-form"'))
    form = page[start : page.index("</form>", start)]
    assert reverse("certification:certify_everywhere", args=[version.pk]) in form
    assert 'name="csrfmiddlewaretoken"' in form and 'name="level"' in form
    assert 'id="everywhere_level"' in form  # not the Certify form's ids
    assert 'data-testid="certify-everywhere-button">' in form  # enabled
    assert reverse("certification:matrix", args=[version.model_id]) in form


def test_the_button_launches_and_the_matrix_lists_them_pending(
    member_client, version, ort, second_ort, torch_profile
):
    url = reverse("certification:certify_everywhere", args=[version.pk])

    response = member_client.post(url, {"level": "basic", "golden_dataset": ""}, follow=True)

    matrix = reverse("certification:matrix", args=[version.model_id])
    assert response.redirect_chain == [(matrix, 302)]
    certs = Certification.objects.all()
    assert sorted(c.profile.key for c in certs) == sorted([ort.key, second_ort.key])
    page = response.content.decode()
    assert page.count('data-state="pending"') == 2
    for cert in certs:
        assert cert.get_absolute_url() in page
    assert "Queued 2 certifications" in page
    assert escape(f"{torch_profile.key} ({why_not(torch_profile, version)})") in page


def test_the_button_says_why_when_nothing_was_launched(member_client, version, ort, torch_profile):
    only_torch_is_served(torch_profile)
    url = reverse("certification:certify_everywhere", args=[version.pk])

    response = member_client.post(url, {"level": "basic"}, follow=True)

    assert response.redirect_chain[-1][0] == version.get_absolute_url() + "#certifications"
    page = response.content.decode()
    assert "Could not certify" in page and "no live worker serves a profile" in page
    assert not Certification.objects.exists()


def test_the_button_is_scoped_and_behind_csrf(outsider, user, version, ort, second_ort):
    url = reverse("certification:certify_everywhere", args=[version.pk])
    outsider_client = Client()
    outsider_client.force_login(outsider)
    assert outsider_client.post(url, {"level": "basic"}).status_code == 404

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    assert strict.post(url, {"level": "basic"}).status_code == 403
    token = strict.get(version.get_absolute_url()).cookies[settings.CSRF_COOKIE_NAME].value
    assert strict.post(url, {"level": "basic"}, HTTP_X_CSRFTOKEN=token).status_code == 302
    assert Certification.objects.count() == 2
