"""The JSON API: token auth, team scoping, upload refusals, idempotent launches, OpenAPI."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from django.conf import settings

from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.models import ModelVersion, RegisteredModel

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")


def stored_files() -> list[Path]:
    root = Path(settings.MEDIA_ROOT)
    return [p for p in root.rglob("*") if p.is_file()]


def upload(api, path: Path, name: str = "mlp", **fields):
    with open(path, "rb") as f:
        return api.post(
            "/api/v1/models", {"name": name, "task": "classification", "file": f, **fields}
        )


def test_it_serves_the_openapi_document(api):
    doc = api.get("/api/v1/openapi.json").json()
    assert {"/api/v1/models", "/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/stages"} <= set(
        doc["paths"]
    )


def test_it_serves_the_api_docs_without_a_cdn(client, db):
    page = client.get("/api/v1/docs").content.decode()
    assert "swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()


@pytest.mark.parametrize("header", [None, "Bearer nope", "Token abc"])
def test_it_requires_a_valid_token(client, db, header):
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    assert client.get("/api/v1/models", **extra).status_code == 401
    assert client.get("/api/v1/stages", **extra).status_code == 401


def test_it_uploads_an_onnx_model_as_version_one(api, mlp_onnx, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = upload(api, mlp_onnx)
    assert response.status_code == 201, response.content
    body = response.json()
    version = body["versions"][0]
    assert version["number"] == 1 and version["format"] == "onnx"
    assert body["latest_version"] == 1  # as stored, not the row before the upload's UPDATE
    assert version["inputs"] == [{"name": "features", "shape": ["batch", 16], "dtype": "float32"}]
    stored = ModelVersion.objects.get(pk=version["id"])
    assert stored.sha256 == __import__("hashlib").sha256(mlp_onnx.read_bytes()).hexdigest()
    # Mirrored to the MLflow Model Registry with its tags.
    assert stored.mlflow_version == "1"


def test_it_refuses_torchscript_without_an_input_shape(api, digits_torchscript):
    response = upload(api, digits_torchscript)
    assert response.status_code == 400
    assert "input shape" in response.json()["detail"]
    assert stored_files() == []


def test_it_accepts_torchscript_with_an_input_shape(api, digits_torchscript):
    response = upload(api, digits_torchscript, input_shape="batch,64")
    assert response.status_code == 201, response.content
    assert response.json()["versions"][0]["inputs"][0]["shape"] == ["batch", 64]


class Canary:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("suffix", [".pt", ".pkl", ".bin"])
def test_it_refuses_a_pickle_and_never_runs_it(api, tmp_path, suffix):
    canary = tmp_path / "canary"
    evil = tmp_path / f"evil{suffix}"
    evil.write_bytes(pickle.dumps(Canary(str(canary))))
    response = upload(api, evil, name="evil")
    assert response.status_code == 400
    assert "pickle" in response.json()["detail"].lower()
    assert not canary.exists()
    assert stored_files() == []
    assert not RegisteredModel.objects.exists()


@pytest.mark.parametrize("content", [b"\x08\x01garbage-not-protobuf" * 10, b"hello, I am text\n"])
def test_it_refuses_a_file_that_is_not_onnx(api, tmp_path, content):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    response = upload(api, bad)
    assert response.status_code == 400
    assert response.json()["detail"]
    assert stored_files() == []


def test_it_refuses_a_truncated_onnx(api, tmp_path, mlp_onnx):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(mlp_onnx.read_bytes()[: mlp_onnx.stat().st_size // 2])
    response = upload(api, cut)
    assert response.status_code == 400
    assert stored_files() == []


def test_it_refuses_a_file_over_the_limit(api, settings, tmp_path):
    settings.R1_MAX_UPLOAD_BYTES = 10_000
    big = tmp_path / "big.onnx"
    big.write_bytes(b"\0" * 50_000)
    response = upload(api, big)
    assert response.status_code == 413
    assert "limit" in response.json()["detail"]
    assert stored_files() == []


def test_it_refuses_a_tensorrt_engine(api, tmp_path):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"ftrt" + b"\x00" * 200)
    response = upload(api, engine)
    assert response.status_code == 400
    assert "TensorRT" in response.json()["detail"]


def test_it_refuses_a_duplicate_model_name(api, mlp_onnx):
    assert upload(api, mlp_onnx).status_code == 201
    response = upload(api, mlp_onnx)
    assert response.status_code == 400
    assert "already has a model" in response.json()["detail"]
    assert len(stored_files()) == 1


@pytest.fixture
def onnx_version(api, mlp_onnx) -> dict:
    return upload(api, mlp_onnx).json()["versions"][0]


def test_it_launches_the_default_pipeline(
    api, onnx_version, django_capture_on_commit_callbacks, enqueued
):
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(
            "/api/v1/jobs", {"version_id": onnx_version["id"]}, content_type="application/json"
        )
    assert response.status_code == 201, response.content
    job = response.json()
    assert job["status"] == JobStatus.QUEUED
    assert [s["name"] for s in job["stages"]] == ["quantize", "compile", "benchmark"]
    assert job["queue"] == "cpu"
    assert enqueued == [job["id"]]


def test_it_makes_one_job_for_a_repeated_key(api, onnx_version):
    payload = {"version_id": onnx_version["id"], "idempotency_key": "click-1"}
    first = api.post("/api/v1/jobs", payload, content_type="application/json")
    second = api.post("/api/v1/jobs", payload, content_type="application/json")
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert Job.objects.count() == 1


def test_it_refuses_a_reused_key_with_other_stages(api, onnx_version):
    payload = {"version_id": onnx_version["id"], "idempotency_key": "k"}
    assert api.post("/api/v1/jobs", payload, content_type="application/json").status_code == 201
    payload["stages"] = [{"name": "benchmark", "settings": {}}]
    response = api.post("/api/v1/jobs", payload, content_type="application/json")
    assert response.status_code == 409
    assert "idempotency_key" in response.json()["detail"]


@pytest.mark.parametrize(
    ("stages", "needle"),
    [
        ([{"name": "no-such-stage"}], "no-such-stage"),
        ([{"name": "export_onnx"}], "torchscript"),
        ([{"name": "benchmark", "settings": {"batch_sizes": []}}], "batch_sizes"),
        ([{"name": "quantize", "settings": {"mode": "int3"}}], "mode"),
        ([{"name": "benchmark", "settings": {"typo_setting": 1}}], "typo_setting"),
    ],
)
def test_it_refuses_a_bad_pipeline_before_queueing(api, onnx_version, stages, needle, enqueued):
    payload = {"version_id": onnx_version["id"], "stages": stages}
    response = api.post("/api/v1/jobs", payload, content_type="application/json")
    assert response.status_code == 400
    assert needle in response.json()["detail"]
    assert not Job.objects.exists() and enqueued == []


def test_it_hides_other_teams_objects(api, client, onnx_version, outsider_token):
    model_id = onnx_version["model_id"]
    job = api.post(
        "/api/v1/jobs", {"version_id": onnx_version["id"]}, content_type="application/json"
    ).json()
    other = {"HTTP_AUTHORIZATION": f"Bearer {outsider_token}"}
    client.defaults.pop("HTTP_AUTHORIZATION")
    assert client.get(f"/api/v1/models/{model_id}", **other).status_code == 404
    assert client.get(f"/api/v1/versions/{onnx_version['id']}", **other).status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}", **other).status_code == 404
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", **other).status_code == 404
    launch = {"version_id": onnx_version["id"]}
    assert (
        client.post("/api/v1/jobs", launch, content_type="application/json", **other).status_code
        == 404
    )
    assert client.get("/api/v1/models", **other).json() == []
    assert client.get("/api/v1/jobs", **other).json() == []


def test_it_cancels_a_queued_job(api, onnx_version):
    job = api.post(
        "/api/v1/jobs", {"version_id": onnx_version["id"]}, content_type="application/json"
    ).json()
    response = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert response.json()["status"] == "cancelled"
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 409


def test_it_lists_stages_with_their_settings_schema(api):
    listed = api.get("/api/v1/stages").json()
    stages = {s["name"]: s for s in listed if s["family"] == "tensor"}
    assert {"export_onnx", "quantize", "compile", "benchmark"} <= set(stages)
    assert "batch_sizes" in stages["benchmark"]["settings_schema"]["properties"]
    text = {s["name"]: s for s in listed if s["family"] == "text-generation"}
    assert "prompt_lengths" in text["benchmark"]["settings_schema"]["properties"]
