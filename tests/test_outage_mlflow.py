"""MLflow down: uploads and jobs go on, the versions say their mirror is pending, and beat's
``r1.mirror_versions`` mirrors them once MLflow is back.

"Down" is real: a port where nothing listens (connection refused) and a black hole (a socket
whose kernel accepts connections that nobody ever answers). MLflow's own defaults (120 s
timeout, 7 retries with backoff) made an upload hang about 250 s and failed every job.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from r1platform.core import tracking
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import BenchmarkResult, MirrorState, ModelVersion
from r1platform.registry.tasks import mirror_versions
from tests.conftest import running_worker, wait_for_job

FAST = 15.0  # seconds: one R1_MLFLOW_TIMEOUT_SECONDS (5) and change


@pytest.fixture
def refused_url() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def black_hole_url() -> Iterator[str]:
    """A server that takes connections (the kernel completes them) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def mlflow_down(settings, request):
    """The test process's MLflow pointed at a dead address (the fixture named by the param)."""
    url = request.getfixturevalue(request.param)
    settings.MLFLOW_TRACKING_URI = url
    tracking.reset()
    yield url
    tracking.reset()


def upload(api, path, name: str, shape: str = ""):
    with open(path, "rb") as f:
        data = {"name": name, "task": "classification", "file": f}
        if shape:
            data["input_shape"] = shape
        return api.post("/api/v1/models", data)


@pytest.mark.parametrize("mlflow_down", ["refused_url", "black_hole_url"], indirect=True)
def test_an_upload_lands_fast_and_says_its_mirror_is_pending(
    api, member_client, mlp_onnx, mlflow_down, django_capture_on_commit_callbacks
):
    started = time.monotonic()
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(api, mlp_onnx, "mlp-down")
    elapsed = time.monotonic() - started

    assert response.status_code == 201, response.content
    assert elapsed < FAST, f"the upload took {elapsed:.1f} s with MLflow down"
    version = ModelVersion.objects.get(pk=response.json()["versions"][0]["id"])
    assert version.mlflow_version == "" and version.mlflow_state == MirrorState.PENDING
    assert "MLflow unreachable" in version.mlflow_error
    page = member_client.get(version.get_absolute_url()).content.decode()
    assert "mirror pending" in page and "MLflow unreachable" in page

    # A second MLflow call in this process does not wait for another timeout.
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.experiment_id("team-a")
    assert time.monotonic() - started < 1.0


@pytest.mark.worker
def test_a_job_runs_to_its_end_with_mlflow_down_and_is_mirrored_when_it_is_back(
    transactional_db, api, mlp_onnx, black_hole_url, settings, tmp_path
):
    settings.MLFLOW_TRACKING_URI = black_hole_url
    tracking.reset()
    uploaded = upload(api, mlp_onnx, "mlp-outage")  # autocommit: the mirror runs here, fails
    assert uploaded.status_code == 201, uploaded.content
    source = ModelVersion.objects.get(pk=uploaded.json()["versions"][0]["id"])
    stages = [
        {"name": "quantize", "settings": {"mode": "int8_dynamic"}},
        {"name": "benchmark", "settings": {"batch_sizes": [1], "iterations": 5}},
    ]

    with running_worker(tmp_path / "worker.log", MLFLOW_TRACKING_URI=black_hole_url):
        response = api.post(
            "/api/v1/jobs",
            {"version_id": source.pk, "stages": stages},
            content_type="application/json",
        )
        assert response.status_code == 201, response.content
        job = wait_for_job(response.json()["id"], timeout=120)

    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    assert "MLflow is unreachable" in job.log_tail and job.mlflow_run_id == ""
    produced = ModelVersion.objects.get(job=job)
    assert produced.precision == "int8" and produced.parent_id == source.pk
    assert BenchmarkResult.objects.filter(job=job).exists(), "the results are in the database"
    for version in (source, produced):
        version.refresh_from_db()
        assert version.mlflow_state == MirrorState.PENDING and not version.mlflow_version

    # MLflow is back (a real store of its own); beat's task mirrors what was pending.
    settings.MLFLOW_TRACKING_URI = f"sqlite:///{tmp_path / 'mlflow-back' / 'mlflow.db'}"
    settings.MLFLOW_ARTIFACT_ROOT = tmp_path / "mlflow-back" / "artifacts"
    assert mirror_versions.apply().get() == 2

    source.refresh_from_db()
    produced.refresh_from_db()
    job.refresh_from_db()
    assert source.mlflow_state == produced.mlflow_state == MirrorState.MIRRORED
    assert (source.mlflow_version, produced.mlflow_version) == ("1", "2")
    assert source.mlflow_error == produced.mlflow_error == ""
    assert job.mlflow_run_id and produced.mlflow_run_id == job.mlflow_run_id
    run = tracking.client().get_run(job.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["r1.mirrored_late"] == "1"
    assert any(k.startswith(f"bench.v{produced.number}.b1.") for k in run.data.metrics)
    registered = tracking.client().get_model_version(source.model.mlflow_name, "2")
    assert registered.tags["r1.job_id"] == str(job.pk)
    assert mirror_versions.apply().get() == 0, "nothing left pending"


def test_the_version_page_retries_a_failed_mirror_now(
    api, member_client, mlp_onnx, refused_url, settings, tmp_path
):
    settings.MLFLOW_TRACKING_URI = refused_url
    tracking.reset()
    uploaded = upload(api, mlp_onnx, "mlp-retry")
    version = ModelVersion.objects.get(pk=uploaded.json()["versions"][0]["id"])
    ModelVersion.objects.filter(pk=version.pk).update(
        mlflow_state=MirrorState.FAILED, mlflow_error="RESOURCE_EXHAUSTED", mlflow_attempts=5
    )
    page = member_client.get(version.get_absolute_url()).content.decode()
    assert 'data-testid="mirror-retry"' in page and "mirror failed" in page

    url = f"/versions/{version.pk}/mirror/"
    still_down = member_client.post(url, follow=True).content.decode()
    assert "did not take v1 yet" in still_down
    version.refresh_from_db()
    assert version.mlflow_state == MirrorState.PENDING  # failed no more: beat keeps trying

    settings.MLFLOW_TRACKING_URI = f"sqlite:///{tmp_path / 'mlflow-back' / 'mlflow.db'}"
    settings.MLFLOW_ARTIFACT_ROOT = tmp_path / "mlflow-back" / "artifacts"
    tracking.reset()
    back = member_client.post(url, follow=True).content.decode()
    version.refresh_from_db()
    assert version.mlflow_state == MirrorState.MIRRORED and version.mlflow_version == "1"
    assert "is MLflow model version 1" in back
    assert 'data-testid="mirror-retry"' not in back
    tracking.reset()
