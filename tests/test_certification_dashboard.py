"""The certification pages: the report page (polled while pending), downloads, re-certify, the
version page's section and Certify form, the compatibility matrix, the team's list; all scoped
to the team and every POST behind CSRF."""

from __future__ import annotations

import io
import json
import os
from dataclasses import replace

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from pypdf import PdfReader

from pipelines.certification.report import CheckId
from r1platform.certification import services
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import storage
from r1platform.jobs.models import Job
from r1platform.workers.services import report_worker
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    finish,
    make_dataset,
    ort_fixture,
    profiles_fixture,
)

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def cert(version, user, ort):
    return services.launch_certification(
        version=version, profile_key=ort.key, level="performance", user=user
    )


@pytest.fixture
def passed(cert):
    return finish(cert)


@pytest.fixture
def outsider_client(outsider):
    client = Client()
    client.force_login(outsider)
    return client


def test_the_report_page_shows_the_verdict_first_then_every_check(member_client, passed):
    page = member_client.get(passed.get_absolute_url()).content.decode()

    verdict = page.index('data-testid="cert-verdict"')
    checks = page.index('data-testid="cert-checks"')
    assert verdict < checks
    assert 'data-status="passed"' in page and 'data-state="valid"' in page
    for check in passed.report["checks"]:
        assert f'data-check="{check["id"]}"' in page
    assert 'data-testid="parity-chart"' in page
    assert passed.version.sha256 in page
    assert reverse("jobs:job_detail", args=[passed.job_id]) in page
    for kind in ("html", "pdf", "json"):
        assert reverse(f"certification:report_{kind}", args=[passed.pk]) in page
    assert 'data-testid="recertify-button"' not in page  # valid: nothing to re-certify


def test_a_pending_certification_polls_until_it_finishes(member_client, cert):
    page = member_client.get(cert.get_absolute_url()).content.decode()
    assert f'hx-get="{cert.get_absolute_url()}"' in page
    assert 'data-testid="cert-pending"' in page

    still = member_client.get(cert.get_absolute_url(), **HX)
    assert still.status_code == 200 and "hx-trigger" in still.content.decode()

    finish(cert)
    done = member_client.get(cert.get_absolute_url(), **HX)
    assert done.status_code == 286  # htmx stops polling
    body = done.content.decode()
    assert "hx-trigger" not in body and 'data-status="passed"' in body
    assert "<html" not in body  # the partial only


def test_a_failed_certification_shows_its_failing_measurement_and_offers_a_rerun(
    member_client, cert
):
    failed = finish(cert, failing=CheckId.PERFORMANCE)
    page = member_client.get(failed.get_absolute_url()).content.decode()
    assert 'data-status="failed"' in page
    assert 'data-check="performance" data-verdict="fail"' in page
    assert "812" in page and "cert-measure-fail" in page
    assert 'data-testid="recertify-button"' in page


def test_the_reports_download_with_their_types_and_names(member_client, passed):
    expected = {"html": "text/html", "pdf": "application/pdf", "json": "application/json"}
    for kind, content_type in expected.items():
        response = member_client.get(reverse(f"certification:report_{kind}", args=[passed.pk]))
        assert response.status_code == 200, kind
        assert response["Content-Type"].startswith(content_type)
        disposition = "inline" if kind == "html" else "attachment"
        assert response["Content-Disposition"] == (
            f'{disposition}; filename="certificate-{passed.pk}-mlp-v1.{kind}"'
        )
    saved = member_client.get(
        reverse("certification:report_html", args=[passed.pk]), {"download": 1}
    )
    assert saved["Content-Disposition"].startswith("attachment;")
    html = member_client.get(reverse("certification:report_html", args=[passed.pk]))
    assert "default-src 'none'" in html["Content-Security-Policy"]
    pdf = member_client.get(reverse("certification:report_pdf", args=[passed.pk])).content
    assert "passed" in PdfReader(io.BytesIO(pdf)).pages[0].extract_text().lower()
    document = json.loads(
        member_client.get(reverse("certification:report_json", args=[passed.pk])).content
    )
    assert document["certificate_id"] == passed.pk


def test_a_report_does_not_exist_until_the_suite_finished(member_client, cert):
    for kind in ("html", "pdf", "json"):
        url = reverse(f"certification:report_{kind}", args=[cert.pk])
        assert member_client.get(url).status_code == 404


def test_recertify_launches_the_same_settings_again(
    member_client, version, user, ort, enqueued, django_capture_on_commit_callbacks
):
    old = services.launch_certification(
        version=version,
        profile_key=ort.key,
        level="performance",
        user=user,
        thresholds={"p99_budget_ms": 40},
    )
    old = finish(old)
    report_worker(WORKER, ["cpu"], [replace(ort.as_pipeline(), backend_version="99.0.0")])
    page = member_client.get(old.get_absolute_url()).content.decode()
    assert 'data-state="invalid"' in page and "99.0.0" in page
    assert 'data-testid="recertify-button"' in page

    with django_capture_on_commit_callbacks(execute=True):
        response = member_client.post(
            reverse("certification:recertify", args=[old.pk]), {"idempotency_key": "again-1"}
        )

    new = Certification.objects.exclude(pk=old.pk).get()
    assert response.status_code == 302 and response["Location"] == new.get_absolute_url()
    assert (new.level, new.profile, new.version) == (old.level, old.profile, old.version)
    assert new.settings == old.settings and new.status == CertStatus.PENDING
    assert enqueued[-1] == new.job_id
    # The same form posted twice (a double click) is one certification.
    member_client.post(
        reverse("certification:recertify", args=[old.pk]), {"idempotency_key": "again-1"}
    )
    assert Certification.objects.count() == 2


def test_a_refused_recertify_says_why(member_client, passed):
    from r1platform.workers.services import worker_stopped

    worker_stopped(WORKER)
    response = member_client.post(reverse("certification:recertify", args=[passed.pk]), follow=True)
    assert "Could not re-certify" in response.content.decode()
    assert Certification.objects.count() == 1


def test_the_version_page_lists_certifications_and_offers_the_form(
    member_client, passed, profiles, team, user, tmp_path
):
    make_dataset(team, user, tmp_path, "golden", features=16, target=True)
    page = member_client.get(passed.version.get_absolute_url()).content.decode()

    assert 'data-testid="certifications"' in page
    assert f'data-profile="{passed.profile.key}" data-state="valid"' in page
    form = page[page.index('data-testid="certify-form"') :]
    assert 'name="csrfmiddlewaretoken"' in form[: form.index("</form>")]
    assert f'value="{profiles["onnxruntime"].key}"' in page
    assert f'value="{profiles["torch"].key}"' not in page  # torch cannot run an ONNX file
    assert "golden v1" in page
    assert reverse("certification:matrix", args=[passed.version.model_id]) in page


def test_the_certify_form_launches_a_certification(
    member_client, version, ort, enqueued, django_capture_on_commit_callbacks
):
    url = reverse("certification:certify", args=[version.pk])
    assert member_client.get(url).status_code == 200
    data = {
        "profile": ort.key,
        "level": "basic",
        "golden_dataset": "",
        "thresholds": '{"p99_budget_ms": 25}',
        "idempotency_key": "form-1",
    }

    with django_capture_on_commit_callbacks(execute=True):
        response = member_client.post(url, data, **HX)

    cert = Certification.objects.get()
    assert response.status_code == 200 and response["HX-Redirect"] == cert.get_absolute_url()
    assert cert.settings["p99_budget_ms"] == 25 and cert.job.queue == "profile." + ort.key
    assert enqueued == [cert.job_id]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"thresholds": "{nope"}, "not valid JSON"),
        ({"thresholds": '{"p99_budget": 1}'}, "unknown threshold"),
        ({"level": "scenario"}, "scenario level needs"),
        ({"profile": "onnxruntime-cpu-elsewhere-1"}, "Select a valid choice"),
    ],
)
def test_the_certify_form_shows_why_it_refused(member_client, version, ort, data, message):
    url = reverse("certification:certify", args=[version.pk])
    form = {"profile": ort.key, "level": "basic", "thresholds": "", **data}

    response = member_client.post(url, form, **HX)

    assert response.status_code == 400
    body = response.content.decode()
    assert message in body and 'id="certify-form"' in body and "<html" not in body
    assert not Job.objects.exists() and not Certification.objects.exists()


def test_the_matrix_shows_each_version_on_each_profile(member_client, passed, profiles):
    path = storage.media_path(passed.version.file)
    page = member_client.get(reverse("certification:matrix", args=[passed.version.model_id]))
    body = page.content.decode()
    assert page.status_code == 200
    assert profiles["onnxruntime"].key in body and profiles["torch"].key in body  # served
    assert 'data-state="valid"' in body and 'data-state="none"' in body
    assert passed.get_absolute_url() in body and "performance" in body

    path.write_bytes(path.read_bytes() + b"\0")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    body = member_client.get(
        reverse("certification:matrix", args=[passed.version.model_id])
    ).content.decode()
    assert 'data-state="invalid"' in body


def test_the_model_page_links_to_its_matrix(member_client, version):
    page = member_client.get(version.model.get_absolute_url()).content.decode()
    assert reverse("certification:matrix", args=[version.model_id]) in page


def test_the_list_shows_only_the_teams_certifications(member_client, outsider_client, passed):
    mine = member_client.get(reverse("certification:list")).content.decode()
    assert passed.get_absolute_url() in mine
    theirs = outsider_client.get(reverse("certification:list")).content.decode()
    assert passed.get_absolute_url() not in theirs


def test_another_team_gets_404_everywhere(outsider_client, passed):
    urls = [
        passed.get_absolute_url(),
        reverse("certification:report_pdf", args=[passed.pk]),
        reverse("certification:report_json", args=[passed.pk]),
        reverse("certification:certify", args=[passed.version_id]),
        reverse("certification:matrix", args=[passed.version.model_id]),
    ]
    for url in urls:
        assert outsider_client.get(url).status_code == 404, url
    assert (
        outsider_client.post(reverse("certification:recertify", args=[passed.pk])).status_code
        == 404
    )
    assert (
        outsider_client.post(
            reverse("certification:certify", args=[passed.version_id]), {"profile": "x"}
        ).status_code
        == 404
    )
    assert Certification.objects.count() == 1


def test_posts_need_the_csrf_token(user, passed, ort):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    certify = reverse("certification:certify", args=[passed.version_id])
    form = {"profile": ort.key, "level": "basic"}
    assert strict.post(certify, form).status_code == 403
    assert strict.post(reverse("certification:recertify", args=[passed.pk])).status_code == 403

    page = strict.get(passed.get_absolute_url())
    token = page.cookies[settings.CSRF_COOKIE_NAME].value
    response = strict.post(certify, form, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 302 and Certification.objects.count() == 2


def test_the_thresholds_show_the_golden_rows_actually_used(member_client, passed):
    # A real suite records every setting as a threshold (suite.py dumps CertifySettings): the
    # golden set is capped at 256 rows, and the generated set had 64.
    passed.report["thresholds"]["golden_rows"] = 256
    passed.save(update_fields=["report"])
    assert passed.report["golden"]["rows"] == 64
    page = member_client.get(passed.get_absolute_url()).content.decode()
    section = page.split("<h2>Thresholds</h2>", 1)[1].split("</section>", 1)[0]
    assert "<code>golden_rows</code></td><td>64 used (at most 256)</td>" in section
