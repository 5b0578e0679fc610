"""Workers report their hardware profiles; jobs bound to a profile need a live worker of it."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from django.utils import timezone

from pipelines.certification.profiles import (
    HardwareProfile as Profile,
)
from pipelines.certification.profiles import (
    compatibility_problem,
    detect_profiles,
)
from r1platform.jobs import services as jobs
from r1platform.jobs.models import Job
from r1platform.queues import profile_of, profile_queue, queue_for
from r1platform.workers import services
from r1platform.workers.models import HardwareProfile, Worker

CPU = Profile(
    backend="onnxruntime",
    backend_version="1.31.1",
    device_kind="cpu",
    device_name="Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
    isa=("avx2", "avx512f"),
    total_memory_mb=24000.0,
)
GPU = Profile(
    backend="tensorrt",
    backend_version="10.3.0",
    device_kind="cuda",
    device_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    driver_version="550.54",
    cuda_version="12.4",
)


def test_this_machine_offers_its_cpu_runtimes():
    found = {p.backend: p for p in detect_profiles()}
    assert {"onnxruntime", "torch"} <= set(found)
    ort = found["onnxruntime"]
    assert ort.device_kind == "cpu" and ort.device_name and ort.total_memory_mb > 0
    assert ort.key.startswith("onnxruntime-cpu-") and len(ort.key) <= 80


def test_a_profile_key_names_the_hardware_and_runtime_but_not_its_version():
    assert replace(CPU, backend_version="1.99.0").key == CPU.key
    assert replace(CPU, isa=("avx2",)).key != CPU.key
    assert replace(GPU, compute_capability="8.9").key != GPU.key
    assert GPU.key.startswith("tensorrt-cuda-nvidia-h100")
    assert Profile.from_dict(GPU.to_dict()) == GPU


@pytest.mark.parametrize(
    ("profile", "fmt", "meta", "reason"),
    [
        (CPU, "onnx", {}, None),
        (CPU, "tensorrt", {}, "runs on tensorrt"),
        (GPU, "tensorrt", {"compute_capability": "9.0", "tensorrt_version": "10.3.0"}, None),
        (GPU, "tensorrt", {"compute_capability": "8.6"}, "built for compute capability 8.6"),
        (GPU, "tensorrt", {"tensorrt_version": "10.1.0"}, "built with TensorRT 10.1.0"),
        (
            GPU,
            "tensorrt",
            {"tensorrt_version": "10.1.0", "flags": {"version_compatible": True}},
            None,
        ),
        (replace(CPU, backend="torch"), "aotinductor", {"device": "cuda"}, "compiled for cuda"),
    ],
)
def test_it_says_why_an_engine_cannot_run_on_a_profile(profile, fmt, meta, reason):
    problem = compatibility_problem(profile, fmt, meta)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and reason in problem


def test_a_worker_records_its_profiles_and_a_new_runtime_version_updates_them(db):
    services.report_worker("w1@host", ["cpu", profile_queue(CPU.key)], [CPU, GPU], pid=42)
    worker = Worker.objects.get(hostname="w1@host")
    assert sorted(worker.profiles.values_list("key", flat=True)) == sorted([CPU.key, GPU.key])
    row = HardwareProfile.objects.get(key=GPU.key)
    assert (row.compute_capability, row.driver_version) == ("9.0", "550.54")
    assert row.as_pipeline() == GPU and row.queue == "profile." + GPU.key

    services.report_worker("w1@host", ["cpu"], [replace(CPU, backend_version="1.32.0")])
    assert HardwareProfile.objects.get(key=CPU.key).backend_version == "1.32.0"
    assert list(worker.profiles.values_list("key", flat=True)) == [CPU.key]


def test_a_profile_is_served_only_while_a_worker_of_it_beats(db, settings):
    assert "no worker has reported" in services.serving_problem(CPU.key)
    services.report_worker("w1@host", ["cpu"], [CPU])
    assert services.serving_problem(CPU.key) is None
    assert list(services.live_profiles()) == [HardwareProfile.objects.get(key=CPU.key)]

    old = timezone.now() - timedelta(seconds=settings.R1_WORKER_LOST_SECONDS + 1)
    Worker.objects.update(last_seen=old)
    assert "no live worker serves profile" in services.serving_problem(CPU.key)
    services.beat("w1@host")
    assert services.serving_problem(CPU.key) is None
    services.worker_stopped("w1@host")
    assert services.serving_problem(CPU.key) is not None


def test_a_certifying_pipeline_goes_to_its_profiles_queue():
    stages = [
        {"name": "compile", "settings": {"backend": "tensorrt"}},
        {"name": "certify", "settings": {"profile": GPU.key}},
    ]
    assert profile_of(stages) == GPU.key
    assert queue_for(stages) == "profile." + GPU.key
    assert queue_for(stages[:1]) == "gpu"


def test_a_job_for_an_unserved_or_unfit_profile_is_refused_before_it_is_queued(
    version, user, monkeypatch
):
    monkeypatch.setattr("r1platform.jobs.services.enqueue", lambda job: None)
    certify = [{"name": "certify", "settings": {"profile": CPU.key}}]
    with pytest.raises(jobs.LaunchRefused, match="no worker has reported"):
        jobs.launch_job(version=version, user=user, stages=certify)
    services.report_worker("gpu@host", ["gpu"], [GPU])
    with pytest.raises(jobs.LaunchRefused, match="runs on onnxruntime"):
        jobs.launch_job(
            version=version,
            user=user,
            stages=[{"name": "certify", "settings": {"profile": GPU.key}}],
        )
    assert not Job.objects.exists()

    services.report_worker("cpu@host", ["cpu"], [CPU])
    job, created = jobs.launch_job(version=version, user=user, stages=certify)
    assert created and job.queue == "profile." + CPU.key
