"""Certification end to end: a real worker reports its profile, runs the real suite, reports."""

from __future__ import annotations

import time

import pytest

from pipelines.certification.profiles import detect_profiles
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import tracking
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import ModelVersion
from r1platform.workers.models import Worker
from tests.conftest import wait_for_job
from tests.test_worker import launch, upload

pytestmark = pytest.mark.worker


def _onnxruntime_profile() -> str:
    return next(p.key for p in detect_profiles() if p.backend == "onnxruntime")


def _wait_reported(key: str, timeout: float = 20.0) -> Worker:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = Worker.objects.filter(profiles__key=key, stopped_at__isnull=True).first()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no worker reported profile {key}")


def _wait_cert(cert_id: int) -> Certification:
    cert = Certification.objects.get(pk=cert_id)
    wait_for_job(cert.job_id, timeout=400)
    cert.refresh_from_db()
    return cert


def _body(response) -> bytes:
    return b"".join(response.streaming_content) if response.streaming else response.content


@pytest.fixture
def digits(api, tmp_path):
    from pipelines.demo import write_digits_dataset

    data = tmp_path / "digits.csv"
    write_digits_dataset(data, "csv")
    with open(data, "rb") as f:
        response = api.post("/api/v1/datasets", {"name": "digits", "file": f, "target": "label"})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_a_worker_certifies_int8_and_fp32_engines_on_its_profile(
    worker, api, digits_torchscript, digits
):
    key = _onnxruntime_profile()
    reported = _wait_reported(key)
    assert "profile." + key in reported.queues
    assert key in [p["key"] for p in api.get("/api/v1/profiles").json()]

    # The engines: FP32 export, then static INT8 calibrated on digits, compiled by onnxruntime.
    v1 = upload(api, digits_torchscript, "digits-cert", "batch,64")
    stages = [
        {"name": "export_onnx", "settings": {}},
        {
            "name": "quantize",
            "settings": {"mode": "int8_static", "calibration_dataset_id": digits},
        },
        {"name": "compile", "settings": {"backend": "onnxruntime"}},
    ]
    job = wait_for_job(launch(api, v1["id"], stages), timeout=400)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    fp32, _, int8 = ModelVersion.objects.filter(job=job).order_by("number")

    ids = {}
    for version in (fp32, int8):
        response = api.post(
            "/api/v1/certifications",
            {
                "version_id": version.pk,
                "profile": key,
                "level": "performance",
                "golden_dataset_id": digits,
                # The source's criteria, bounded for a test: 1,000 requests (the least allowed),
                # a 3 s QPS run, and a floor a busy 2-core CI machine clears.
                "thresholds": {"api_requests": 1000, "qps_seconds": 3, "min_qps_per_card": 20},
            },
            content_type="application/json",
        )
        assert response.status_code == 201, response.content
        ids[version.precision] = response.json()["id"]

    for precision, cert_id in ids.items():
        cert = _wait_cert(cert_id)
        assert cert.status == CertStatus.PASSED, (precision, cert.error, cert.report)
        assert cert.job.queue == "profile." + key and cert.job.worker_host == reported.hostname
        checks = {c["id"]: c for c in cert.report["checks"]}
        assert list(checks) == [
            "loads", "parity", "shapes", "finite", "determinism", "api_success", "performance",
            "serving", "qps", "scenario",
        ]  # fmt: skip
        # The worker served the engine with the platform's runtime and compared the answers.
        assert checks["serving"]["verdict"] == "pass", checks["serving"]
        api_success = {m["name"]: m["value"] for m in checks["api_success"]["measurements"]}
        assert api_success["requests"] == 1000 and api_success["success_rate"] == 1.0
        qps = {m["name"]: m["value"] for m in checks["qps"]["measurements"]}
        assert qps["qps_per_card"] >= 20 and qps["error_rate"] == 0.0
        criteria = [(c["level"], c["verdict"]) for c in cert.report["criteria"]]
        assert criteria == [("basic", "pass"), ("performance", "pass"), ("scenario", "not_run")]
        assert checks["scenario"]["verdict"] == "not_run"  # above the performance level
        assert {c["verdict"] for c in list(checks.values())[:9]} == {"pass"}
        parity = {m["name"]: m for m in checks["parity"]["measurements"]}
        if precision == "int8":
            # INT8 is judged by task-metric retention against the FP32 ancestor on the labels.
            judged = [m for m in parity.values() if m["threshold"] is not None]
            assert judged and all(m["passed"] for m in judged)
            assert any("retention" in m["name"] for m in judged), judged
        assert cert.report["reference"]["precision"] == "fp32"
        assert cert.engine_sha256 == cert.version.sha256

        body = api.get(f"/api/v1/certifications/{cert_id}").json()
        assert body["status"] == "passed" and body["validity"]["valid"] is True
        pdf = api.get(f"/api/v1/certifications/{cert_id}/report.pdf")
        assert pdf.status_code == 200 and _body(pdf).startswith(b"%PDF")
        document = api.get(f"/api/v1/certifications/{cert_id}/report.json").json()
        assert document["certificate_id"] == cert_id and document["verdict"] == "passed"
        answer = api.get(
            f"/api/v1/versions/{cert.version_id}/certified",
            {"level": "basic", "profile": key},
        ).json()
        assert answer["certified"] is True and answer["certification_id"] == cert_id

        artifacts = [
            a.path
            for a in tracking.client().list_artifacts(cert.job.mlflow_run_id, "certification")
        ]
        assert any(a.endswith(".pdf") for a in artifacts), artifacts


def test_a_certify_stage_in_a_pipeline_certifies_what_the_pipeline_made(
    worker, api, digits_torchscript
):
    key = _onnxruntime_profile()
    _wait_reported(key)
    v1 = upload(api, digits_torchscript, "digits-pipe", "batch,64")
    stages = [
        {"name": "export_onnx", "settings": {}},
        {"name": "compile", "settings": {"backend": "onnxruntime"}},
        # A budget nobody meets: the suite fails its performance check and the QPS criterion
        # (p99 at that load is over budget), and says so.
        {
            "name": "certify",
            "settings": {
                "profile": key,
                "level": "performance",
                "p99_budget_ms": 1e-6,
                "api_requests": 1000,
                "qps_seconds": 2,
                "min_qps_per_card": 1,
            },
        },
    ]
    job = wait_for_job(launch(api, v1["id"], stages), timeout=400)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    compiled = ModelVersion.objects.get(job=job, backend="onnxruntime")
    cert = Certification.objects.get(job=job)
    assert cert.version == compiled and cert.status == CertStatus.FAILED
    failed = [c["id"] for c in cert.report["checks"] if c["verdict"] == "fail"]
    assert failed == ["performance", "qps"]
    qps_check = next(c for c in cert.report["checks"] if c["id"] == "qps")
    qps = {m["name"]: m for m in qps_check["measurements"]}
    assert qps["p99_ms"]["passed"] is False and qps["qps_per_card"]["passed"] is True
    page = api.get(f"/api/v1/certifications/{cert.pk}/report.html")
    assert page.status_code == 200 and b"performance" in page.content.lower()
