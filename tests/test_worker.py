"""A real worker process over the real broker: upload to produced versions, failures, MLflow."""

from __future__ import annotations

import pytest

from r1platform.core import tracking
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import BenchmarkResult, ModelVersion
from tests.conftest import wait_for_job, wait_for_run_status

pytestmark = pytest.mark.worker


def upload(api, path, name, shape):
    with open(path, "rb") as f:
        data = {"name": name, "task": "classification", "file": f, "input_shape": shape}
        response = api.post("/api/v1/models", data)
    assert response.status_code == 201, response.content
    return response.json()["versions"][0]


def launch(api, version_id, stages=None):
    payload = {"version_id": version_id, "stages": stages}
    response = api.post("/api/v1/jobs", payload, content_type="application/json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_it_runs_a_real_job_from_upload_to_versions(worker, api, digits_torchscript):
    v1 = upload(api, digits_torchscript, "digits", "batch,64")
    job = wait_for_job(launch(api, v1["id"]))
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    assert job.progress == 1.0 and job.attempts == 1 and job.worker_host

    produced = list(ModelVersion.objects.filter(job=job).order_by("number"))
    # export_onnx -> quantize -> compile, each the parent of the next, back to the upload.
    assert [(v.number, v.format, v.precision) for v in produced] == [
        (2, "onnx", "fp32"),
        (3, "onnx", "int8"),
        (4, "onnx", "int8"),
    ]
    assert [v.parent_id for v in produced] == [v1["id"], produced[0].pk, produced[1].pk]
    assert produced[2].backend == "onnxruntime"
    assert produced[1].size_bytes < produced[0].size_bytes

    rows = BenchmarkResult.objects.filter(job=job)
    assert {r.version_id for r in rows} >= {v.pk for v in produced}
    assert all(0 < r.p50_ms <= r.p95_ms <= r.p99_ms and r.throughput > 0 for r in rows)

    body = api.get(f"/api/v1/jobs/{job.pk}").json()
    assert body["status"] == "succeeded"
    assert body["produced_version_ids"] == [v.pk for v in produced]
    assert [r["status"] for r in body["stage_results"]] == ["succeeded"] * 4

    assert wait_for_run_status(job.mlflow_run_id) == "FINISHED"
    run = tracking.client().get_run(job.mlflow_run_id)
    assert any(k.startswith("bench.v3.b1.") for k in run.data.metrics)
    registered = tracking.client().search_model_versions(f"name = '{job.team.slug}.digits'")
    assert len(registered) == 4
    by_number = {mv.tags["r1.version"]: mv for mv in registered}
    assert by_number["3"].tags["precision"] == "int8"
    assert by_number["3"].tags["parent_version"] == "2"


def test_it_fails_a_job_whose_stage_raises_and_says_why(worker, api, digits_torchscript):
    # The model takes 64 features; declaring 32 makes the export stage's trial run fail.
    v1 = upload(api, digits_torchscript, "digits-wrong-shape", "batch,32")
    job = wait_for_job(launch(api, v1["id"]))
    assert job.status == JobStatus.FAILED
    assert "shape" in job.error
    assert job.stage_results[0]["status"] == "failed"
    assert not ModelVersion.objects.filter(job=job).exists()
    assert wait_for_run_status(job.mlflow_run_id) == "FAILED"


def _pool_children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_it_finishes_once_after_the_worker_process_is_killed(worker, api, digits_torchscript):
    import os
    import signal
    import time

    from r1platform.jobs.models import Job

    v1 = upload(api, digits_torchscript, "digits-killed", "batch,64")
    slow_benchmark = {"batch_sizes": [1, 8, 32, 64], "warmup": 20, "iterations": 3000}
    stages = [
        {"name": "export_onnx"},
        {"name": "quantize"},
        {"name": "compile"},
        {"name": "benchmark", "settings": slow_benchmark},
    ]
    job_id = launch(api, v1["id"], stages)
    deadline = time.monotonic() + 120
    while Job.objects.get(pk=job_id).current_stage != "benchmark":
        assert time.monotonic() < deadline, Job.objects.get(pk=job_id).log_tail
        time.sleep(0.2)
    (child,) = _pool_children(worker.pid)
    os.kill(child, signal.SIGKILL)

    job = wait_for_job(job_id, timeout=300)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"
    assert job.attempts == 2
    assert "resuming from the saved pipeline context" in job.log_tail
    # One result: each artifact registered once, in the registry and in MLflow.
    assert ModelVersion.objects.filter(job=job).count() == 3
    registered = tracking.client().search_model_versions(f"name = '{job.team.slug}.digits-killed'")
    assert len(registered) == 4
    rows = BenchmarkResult.objects.filter(job=job)
    assert rows.count() == len({(r.version_id, r.backend, r.batch_size) for r in rows})


def test_it_runs_the_demo_pipeline_with_a_dataset(worker, api, digits_torchscript, tmp_path):
    from pipelines.demo import write_digits_dataset
    from r1platform.core.demo import demo_pipeline

    data = tmp_path / "digits.csv"
    write_digits_dataset(data, "csv")
    with open(data, "rb") as f:
        response = api.post("/api/v1/datasets", {"name": "digits", "file": f, "target": "label"})
    assert response.status_code == 201, response.content
    dataset_id = response.json()["id"]
    v1 = upload(api, digits_torchscript, "digits-demo", "batch,64")
    stages = demo_pipeline(dataset_id)
    stages[0]["settings"]["epochs"] = 2
    stages[-1]["settings"] = {"batch_sizes": [1, 32], "min_seconds": 0.05, "max_windows": 3}
    job = wait_for_job(launch(api, v1["id"], stages), timeout=400)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"

    produced = list(ModelVersion.objects.filter(job=job).order_by("number"))
    kinds = [(v.format, v.precision, v.backend) for v in produced]
    assert kinds == [
        ("torchscript", "fp32", ""),  # fine-tuned
        ("onnx", "fp32", ""),  # its export
        ("onnx", "int8", ""),  # static Q/DQ
        ("onnx", "int8", "onnxruntime"),  # compiled
    ]
    assert produced[0].parent_id == v1["id"]
    assert [v.parent_id for v in produced[1:]] == [v.pk for v in produced[:-1]]
    int8 = produced[2]
    assert int8.metrics["retention"] >= 0.98 and int8.metrics["size_ratio"] < 0.5
    compiled = produced[3]
    assert compiled.metrics["accuracy"] > 0.85 and "retention" in compiled.metrics

    body = api.get(f"/api/v1/versions/{compiled.pk}").json()
    assert body["metrics"]["accuracy"] == compiled.metrics["accuracy"]
    assert {b["batch_size"] for b in body["benchmarks"]} == {1, 32}
    assert all(b["p90_ms"] is not None for b in body["benchmarks"])
    # Every row says the shapes it was timed at.
    assert {(b["batch_size"], tuple(b["shapes"]["input"])) for b in body["benchmarks"]} == {
        (1, (1, 64)),
        (32, (32, 64)),
    }

    history = tracking.client().get_metric_history(job.mlflow_run_id, "01-finetune.val_accuracy")
    assert len(history) >= 2  # one point per epoch, logged at its step
    # The same curve is kept on the job, and drawn on the job's and the version's pages.
    finetune = next(r for r in job.stage_results if r["name"] == "finetune")
    assert [
        e["metrics"]["val_accuracy"] for e in finetune["history"] if "val_accuracy" in e["metrics"]
    ] == [h.value for h in sorted(history, key=lambda h: h.step)]
