"""/metrics on the web process: every family with the right values, its access rule, the broker
bound, GPU samples, and prometheus-client's multiprocess mode under a real prefork worker."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from gpu_workers import nvml
from r1platform.celery import app as celery_app
from r1platform.jobs.models import Job, JobStatus
from r1platform.monitoring import collectors
from r1platform.monitoring import metrics as platform_metrics
from r1platform.registry.models import RegisteredModel
from r1platform.registry.services import register_version
from r1platform.workers import services
from r1platform.workers.models import Worker
from tests.conftest import ROOT, running_worker, wait_for_job

URL = reverse("metrics")
H100 = {
    "index": 0,
    "uuid": "GPU-1234",
    "name": "NVIDIA H100",
    "utilization": 0.75,
    "memory_used_bytes": 40 * 2**30,
    "memory_total_bytes": 80 * 2**30,
}


def scrape(client, **headers) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = client.get(URL, **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def family_names(client) -> set[str]:
    text = client.get(URL).content.decode()
    return {f.name for f in text_string_to_metric_families(text)}


def make_job(team, status: str, stage: str = "", queue: str = "cpu") -> Job:
    model, _ = RegisteredModel.objects.get_or_create(
        team=team, name="m", defaults={"mlflow_name": f"{team.slug}.m"}
    )
    version = model.versions.first() or register_version(
        model,
        relative_file="models/x.onnx",
        sha256="a" * 64,
        size_bytes=10,
        format="onnx",
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    return Job.objects.create(
        team=team,
        version=version,
        stages=[{"name": "benchmark", "settings": {}}],
        queue=queue,
        idempotency_key=uuid.uuid4().hex,
        status=status,
        current_stage=stage,
    )


def make_worker(hostname: str, *, queues=("cpu",), silent_for=0.0, stopped=False, gpus=()):
    services.report_worker(hostname, list(queues), [], pid=7)
    Worker.objects.filter(hostname=hostname).update(
        last_seen=timezone.now() - timedelta(seconds=silent_for),
        stopped_at=timezone.now() if stopped else None,
        gpus=list(gpus),
    )
    return Worker.objects.get(hostname=hostname)


@pytest.fixture
def waiting_queue():
    """A queue of its own holding one message nobody consumes; purged afterwards."""
    name = f"metrics-test-{uuid.uuid4().hex[:8]}"
    celery_app.send_task("r1.nothing", queue=name)
    yield name
    with celery_app.connection_for_write() as conn:
        conn.default_channel.queue_purge(name)


# -- the families and their values --------------------------------------------------------------


def test_it_exposes_every_platform_family_with_its_values(client, team, waiting_queue):
    make_job(team, JobStatus.SUCCEEDED, stage="benchmark")
    make_job(team, JobStatus.RUNNING, stage="quantize")
    make_job(team, JobStatus.QUEUED, queue="gpu")
    live = make_worker("live@a", queues=["cpu", waiting_queue], gpus=[H100])
    make_worker("lost@b", silent_for=settings.R1_WORKER_LOST_SECONDS + 5, gpus=[H100])
    make_worker("stopped@c", stopped=True)
    before = scrape(client)
    platform_metrics.record_stage("benchmark", "succeeded", 3.5)
    platform_metrics.record_job_finished("succeeded")

    samples = scrape(client)

    names = family_names(client)
    assert set(collectors.FAMILIES) <= names
    assert set(platform_metrics.FAMILIES) <= names
    assert samples[("r1_jobs", (("stage", ""), ("status", "succeeded")))] == 1
    assert samples[("r1_jobs", (("stage", "quantize"), ("status", "running")))] == 1
    assert samples[("r1_jobs", (("stage", ""), ("status", "failed")))] == 0
    assert samples[("r1_queued_jobs", (("queue", "gpu"),))] == 1
    assert samples[("r1_queued_jobs", (("queue", "cpu"),))] == 0
    # Waiting in the broker: the message sent to a queue only a live worker reported.
    assert samples[("r1_queue_depth", (("queue", waiting_queue),))] == 1
    assert samples[("r1_queue_depth", (("queue", "gpu"),))] == 0
    assert samples[("r1_broker_up", ())] == 1
    assert samples[("r1_workers", (("state", "live"),))] == 1
    assert samples[("r1_workers", (("state", "lost"),))] == 1
    assert samples[("r1_workers", (("state", "stopped"),))] == 1
    assert samples[("r1_worker_up", (("hostname", "live@a"),))] == 1
    assert samples[("r1_worker_up", (("hostname", "lost@b"),))] == 0
    assert ("r1_worker_up", (("hostname", "stopped@c"),)) not in samples
    beat = samples[("r1_worker_last_heartbeat_timestamp_seconds", (("hostname", "live@a"),))]
    assert beat == pytest.approx(live.last_seen.timestamp())
    gpu = (("gpu", "0"), ("hostname", "live@a"), ("name", "NVIDIA H100"))
    assert samples[("r1_gpu_utilization_ratio", gpu)] == 0.75
    assert samples[("r1_gpu_memory_used_bytes", gpu)] == 40 * 2**30
    assert samples[("r1_gpu_memory_total_bytes", gpu)] == 80 * 2**30
    # A lost worker's last sample is not the GPU's state now.
    assert not any(k[0].startswith("r1_gpu_") and ("hostname", "lost@b") in k[1] for k in samples)
    assert samples[("r1_schedules", (("enabled", "true"),))] == 0
    assert samples[("r1_schedule_runs", (("decision", "promoted"),))] == 0

    def delta(name: str, labels: tuple) -> float:
        return samples[(name, labels)] - before.get((name, labels), 0.0)

    stage = (("stage", "benchmark"), ("status", "succeeded"))
    assert delta("r1_stage_runs_total", stage) == 1
    assert delta("r1_stage_duration_seconds_count", stage) == 1
    assert delta("r1_stage_duration_seconds_sum", stage) == 3.5
    bucket = tuple(sorted((*stage, ("le", "5.0"))))
    assert delta("r1_stage_duration_seconds_bucket", bucket) == 1
    assert delta("r1_jobs_finished_total", (("status", "succeeded"),)) == 1


def test_it_leaves_gpu_families_out_without_a_gpu(client, db):
    make_worker("cpu-only@a")

    assert not {n for n in family_names(client) if n.startswith("r1_gpu_")}


def test_it_answers_in_a_fixed_number_of_queries(client, team, django_assert_max_num_queries):
    for i in range(5):
        make_worker(f"w{i}@a", gpus=[H100])
        make_job(team, JobStatus.RUNNING, stage=f"s{i}")

    with django_assert_max_num_queries(5):
        client.get(URL)


def test_it_skips_a_broker_that_does_not_answer_in_time(client, db, monkeypatch):
    release = threading.Event()

    def hung(queues, timeout):
        release.wait(30)
        return {}

    monkeypatch.setattr(collectors, "_ask_broker", hung)
    monkeypatch.setattr(collectors, "BROKER_TIMEOUT_SECONDS", 0.3)
    try:
        started = time.monotonic()
        samples = scrape(client)
        # While that probe hangs, the next scrape does not start another one and is quick.
        again = scrape(client)
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert elapsed < 2
    assert samples[("r1_broker_up", ())] == 0 and again[("r1_broker_up", ())] == 0
    assert not any(name == "r1_queue_depth" for name, _ in samples)
    assert samples[("r1_workers", (("state", "live"),))] == 0  # the database part still answers


# -- who may read it ----------------------------------------------------------------------------


def test_it_is_open_without_a_token_and_needs_no_login(client, db):
    assert client.get(URL).status_code == 200


def test_it_needs_the_bearer_token_when_one_is_set(client, db, settings):
    settings.R1_METRICS_TOKEN = "s3cret-token"

    assert client.get(URL).status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert client.get(URL, HTTP_AUTHORIZATION="Basic s3cret-token").status_code == 401
    response = client.get(URL, HTTP_AUTHORIZATION="Bearer s3cret-token")
    assert response.status_code == 200 and b"r1_jobs" in response.content


def test_it_refuses_a_post(client, db):
    assert client.post(URL).status_code == 405


# -- GPU samples --------------------------------------------------------------------------------


def test_nvml_returns_nothing_here_without_raising(monkeypatch):
    monkeypatch.setattr(nvml, "_initialised", False)

    assert nvml.sample_gpus() == []


class FakeNvml(types.ModuleType):
    """Two GPUs as pynvml reports them; the second does not report utilisation."""

    class NVMLError(Exception):
        pass

    def __init__(self, fail_init: bool = False) -> None:
        super().__init__("pynvml")
        self.fail_init = fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=(h + 1) * 2**30, total=16 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, h):
        if h == 1:
            raise self.NVMLError("Not Supported")
        return types.SimpleNamespace(gpu=42)

    def nvmlDeviceGetUUID(self, h):
        return f"GPU-{h}aaa"

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"


def test_nvml_samples_each_visible_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setattr(nvml, "_initialised", False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    first, second = nvml.sample_gpus()

    assert first.as_dict() == {
        "index": 0,
        "uuid": "GPU-0aaa",
        "name": "Fake GPU",
        "utilization": 0.42,
        "memory_used_bytes": 2**30,
        "memory_total_bytes": 16 * 2**30,
    }
    assert second.utilization is None and second.memory_used_bytes == 2 * 2**30
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in nvml.sample_gpus()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-0a")
    assert [g.index for g in nvml.sample_gpus()] == [0]


def test_nvml_returns_nothing_when_the_driver_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(fail_init=True))
    monkeypatch.setattr(nvml, "_initialised", False)

    assert nvml.sample_gpus() == []


def test_a_beat_stores_the_gpu_sample_and_none_keeps_it(db):
    make_worker("gpu@a")

    services.beat("gpu@a", gpus=[H100])
    assert Worker.objects.get(hostname="gpu@a").gpus == [H100]
    services.beat("gpu@a")
    assert Worker.objects.get(hostname="gpu@a").gpus == [H100]
    services.beat("gpu@a", gpus=[])
    assert Worker.objects.get(hostname="gpu@a").gpus == []


def test_the_workers_page_shows_each_workers_gpus(member_client):
    make_worker("gpu@a", gpus=[H100])

    page = member_client.get(reverse("workers:worker_list")).content.decode()

    assert 'data-testid="worker-gpu"' in page
    assert "NVIDIA H100" in page and "75%" in page and "40.0\xa0GB / 80.0\xa0GB" in page


# -- multiprocess mode --------------------------------------------------------------------------


def test_the_serving_process_stays_out_of_multiprocess_mode(tmp_path):
    # Its ServingMetrics must be one process's own, whatever the environment says.
    code = (
        "import django; django.setup()\n"
        "import r1platform.serving.management.commands.serve\n"
        "from prometheus_client import values\n"
        "print(values.ValueClass is values.MutexValue)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_serving_samples_written_inside_a_worker_stay_out_of_the_platform_metrics(tmp_path):
    # The certification's serving probe runs the serving runtime in a worker process.
    code = (
        "import django; django.setup()\n"
        "from r1platform.serving.metrics import ServingMetrics\n"
        "from r1platform.monitoring import metrics\n"
        "ServingMetrics().requests.labels('t/m', '1', '200').inc()\n"
        "metrics.record_job_finished('succeeded')\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    assert any("r1_serving" in p.read_bytes().decode("latin-1") for p in tmp_path.glob("*.db"))

    names = {m.name for m in collectors.ProcessFilesCollector(tmp_path).collect()}

    assert "r1_jobs_finished" in names
    assert not [n for n in names if n.startswith("r1_serving")]


@pytest.fixture
def prefork_worker(transactional_db, tmp_path):
    """A real worker with two pool children, in multiprocess mode, writing to a sub-folder."""
    metrics_dir = tmp_path / "metrics"
    # A folder below the one /metrics reads, as a compose service has; the worker makes it.
    folder = str(metrics_dir / "worker-cpu")
    with running_worker(
        tmp_path / "worker.log", concurrency=2, prefix="mp", PROMETHEUS_MULTIPROC_DIR=folder
    ):
        yield metrics_dir


@pytest.mark.worker
def test_it_adds_up_the_samples_of_every_pool_child(
    prefork_worker, api, client, mlp_onnx, monkeypatch
):
    metrics_dir: Path = prefork_worker
    with open(mlp_onnx, "rb") as f:
        response = api.post("/api/v1/models", {"name": "mp", "task": "classification", "file": f})
    assert response.status_code == 201, response.content
    version_id = response.json()["versions"][0]["id"]
    # Long enough (about 2 s each) that the two children run them side by side.
    bench = {"batch_sizes": [1], "warmup": 2, "iterations": 5, "min_seconds": 0.4,
             "max_windows": 4, "targets": "current"}  # fmt: skip
    ids = []
    for _ in range(4):
        payload = {"version_id": version_id, "stages": [{"name": "benchmark", "settings": bench}]}
        response = api.post("/api/v1/jobs", payload, content_type="application/json")
        assert response.status_code == 201, response.content
        ids.append(response.json()["id"])
    jobs = [wait_for_job(i, timeout=180) for i in ids]
    assert all(j.status == JobStatus.SUCCEEDED for j in jobs), [j.error for j in jobs]

    # Each child wrote a file of its own: more than one pid.
    pids = {p.stem.rsplit("_", 1)[1] for p in (metrics_dir / "worker-cpu").glob("counter_*.db")}
    assert len(pids) >= 2, sorted(p.name for p in metrics_dir.rglob("*"))
    # The web process reads the folder it is given and every folder below it.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    samples = scrape(client)
    stage = (("stage", "benchmark"), ("status", "succeeded"))
    assert samples[("r1_jobs_finished_total", (("status", "succeeded"),))] == 4
    assert samples[("r1_stage_runs_total", stage)] == 4
    assert samples[("r1_stage_duration_seconds_count", stage)] == 4
    assert samples[("r1_jobs", (("stage", ""), ("status", "succeeded")))] == 4
    assert samples[("r1_workers", (("state", "live"),))] == 1
