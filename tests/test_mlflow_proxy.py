"""The /mlflow/ pages stand in front of MLflow, which has no login: a team sees its own runs,
models and artifacts; another team's are 404, anonymous users are sent to log in.

The store is real (the test settings' MLflow SQLite store): the objects are made by the
platform's own mirror and tracking helpers, then read back through the pages.
"""

from __future__ import annotations

import socket
import uuid

import pytest
from django.urls import reverse

from r1platform.core import tracking
from r1platform.core.storage import spool_local_file
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.mirror import mirror_to_mlflow
from r1platform.registry.services import upload_model


@pytest.fixture
def proxy_links(settings):
    settings.R1_MLFLOW_LINKS = "proxy"


@pytest.fixture
def mirrored(team, user, mlp_onnx, tmp_path) -> dict[str, object]:
    """Team A's uploaded version mirrored to MLflow, and a job with a run holding a file."""
    tracking.reset()
    # A name of its own: the MLflow store lives for the whole session (other tests count on
    # their model's MLflow version numbers).
    version = upload_model(
        team=team,
        user=user,
        name=f"proxy-{uuid.uuid4().hex[:8]}",
        task="classification",
        uploaded=spool_local_file(mlp_onnx),
    )
    assert mirror_to_mlflow(version)
    job = Job.objects.create(
        team=version.team,
        version=version,
        stages=[{"name": "benchmark", "settings": {}}],
        queue="cpu",
        idempotency_key=uuid.uuid4().hex,
        status=JobStatus.SUCCEEDED,
    )
    experiment, run_id = tracking.open_run(f"team-{version.team.slug}", "job run", {"k": "v"})
    assert run_id
    tracking.log_params(run_id, {"stages": "benchmark"})
    tracking.log_metrics(run_id, {"bench.p50_ms": 1.5})
    report = tmp_path / "report.json"
    report.write_text('{"secret": "team-a"}')
    tracking.log_artifact(run_id, report, "reports")
    Job.objects.filter(pk=job.pk).update(mlflow_run_id=run_id, mlflow_experiment_id=experiment)
    version.refresh_from_db()
    return {"version": version, "job": job, "run_id": run_id}


def urls(objs) -> list[str]:
    version, job = objs["version"], objs["job"]
    return [
        reverse("mlflow:job_run", args=[job.pk]),
        reverse("mlflow:job_run", args=[job.pk]) + "?path=reports/report.json",
        reverse("mlflow:version_run", args=[version.pk]),
        reverse("mlflow:model_version", args=[version.pk]),
        reverse("mlflow:model", args=[version.model_id]),
        reverse("mlflow:experiment", args=[version.team_id]),
    ]


def test_team_a_sees_its_run_model_and_artifacts(member_client, mirrored):
    version, job = mirrored["version"], mirrored["job"]

    run_page = member_client.get(reverse("mlflow:job_run", args=[job.pk]))
    folder = member_client.get(reverse("mlflow:job_run", args=[job.pk]) + "?path=reports")
    file = member_client.get(reverse("mlflow:job_run", args=[job.pk]) + "?path=reports/report.json")
    upload_run = member_client.get(reverse("mlflow:version_run", args=[version.pk]))
    model_version = member_client.get(reverse("mlflow:model_version", args=[version.pk]))
    model = member_client.get(reverse("mlflow:model", args=[version.model_id]))

    assert run_page.status_code == 200
    body = run_page.content.decode()
    assert mirrored["run_id"] in body and "bench.p50_ms" in body and "stages" in body
    assert "report.json" in folder.content.decode()
    assert file.status_code == 200 and file["Content-Type"] == "application/octet-stream"
    assert file["Content-Disposition"].startswith("attachment")
    assert b"".join(file.streaming_content) == b'{"secret": "team-a"}'
    assert upload_run.status_code == 200 and f"v{version.number}" in upload_run.content.decode()
    assert "versions" in upload_run.content.decode(), "the upload run lists its file's folder"
    assert model_version.status_code == 200
    assert version.sha256 in model_version.content.decode(), "the MLflow version's tags"
    assert model.status_code == 200 and "version 1" in model.content.decode()


def test_another_team_gets_404_for_every_one_of_them(client, outsider, mirrored):
    client.force_login(outsider)
    for url in urls(mirrored):
        assert client.get(url).status_code == 404, url


def test_anonymous_users_are_sent_to_log_in(client, mirrored):
    for url in urls(mirrored):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login")), url


@pytest.mark.parametrize(
    "path", ["../../etc/passwd", "/etc/passwd", "reports/../../x", "reports\\report.json"]
)
def test_an_artifact_path_outside_the_run_is_404(member_client, mirrored, path):
    url = reverse("mlflow:job_run", args=[mirrored["job"].pk]) + f"?path={path}"
    assert member_client.get(url).status_code == 404


def test_an_artifact_over_the_size_limit_is_refused(member_client, mirrored, settings):
    settings.R1_MLFLOW_PROXY_MAX_BYTES = 5
    url = reverse("mlflow:job_run", args=[mirrored["job"].pk]) + "?path=reports/report.json"
    assert member_client.get(url).status_code == 404


def test_proxy_links_point_at_the_platform_pages(member_client, mirrored, proxy_links):
    version, job = mirrored["version"], mirrored["job"]

    version_page = member_client.get(version.get_absolute_url()).content.decode()
    model_page = member_client.get(version.model.get_absolute_url()).content.decode()
    job_page = member_client.get(job.get_absolute_url()).content.decode()

    assert f'href="{reverse("mlflow:model_version", args=[version.pk])}"' in version_page
    assert f'href="{reverse("mlflow:model", args=[version.model_id])}"' in model_page
    assert f'href="{reverse("mlflow:job_run", args=[job.pk])}"' in job_page
    assert f'href="{reverse("mlflow:index")}"' in job_page, "the nav link"


def test_a_run_page_with_mlflow_down_answers_fast_with_why(member_client, mirrored, settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        settings.MLFLOW_TRACKING_URI = f"http://127.0.0.1:{s.getsockname()[1]}"
    tracking.reset()

    response = member_client.get(reverse("mlflow:job_run", args=[mirrored["job"].pk]))

    assert response.status_code == 503
    assert "MLflow cannot be reached right now" in response.content.decode()
    tracking.reset()
