"""Where work is sent: the queues (the one place that knows their names) and the task names.

Services send work by task name (``r1platform.celery.app.send_task``), so no service imports a
task module and ``r1platform`` never imports ``gpu_workers``; the task modules register under
these names (``gpu_workers.tasks`` for jobs, each app's ``tasks.py`` for the rest). This module
imports nothing of the project: settings, services and the worker's lifecycle all read it.
"""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


class TaskName(StrEnum):
    """The name of every task; changing one strands the messages already queued under it."""

    RUN_JOB = "r1.run_job"
    REAP = "r1.reap"
    RUN_SCHEDULE = "r1.run_schedule"
    DECIDE_SCHEDULE_RUN = "r1.decide_schedule_run"
    DELIVER_NOTIFICATION = "r1.deliver_notification"
    SEND_UNSENT_JOBS = "r1.send_unsent_jobs"
    MIRROR_VERSIONS = "r1.mirror_versions"


# Every worker also consumes one queue per hardware profile it offers: a job that must run on a
# given profile (a certification) goes there, so only a worker of that profile takes it.
PROFILE_QUEUE_PREFIX = "profile."

# Stage settings that can only run on an NVIDIA GPU.
_GPU_BACKENDS = {"tensorrt"}


def profile_queue(profile_key: str) -> str:
    """The queue that reaches the workers of one hardware profile."""
    return PROFILE_QUEUE_PREFIX + profile_key


def profile_of(stages: list[dict]) -> str | None:
    """The hardware profile a pipeline must run on (its certify stage's), if any."""
    for stage in stages:
        profile = stage.get("settings", {}).get("profile")
        if stage.get("name") == "certify" and profile:
            return str(profile)
    return None


# Language-model quantize precisions only a GPU worker makes (NVIDIA Model Optimizer).
_GPU_PRECISIONS = frozenset({"fp8", "int4_awq"})


def queue_for(stages: list[dict]) -> str:
    """A profile's queue if a stage names one, else the GPU queue if a stage needs a GPU, else CPU.

    A pipeline that certifies runs where it certifies: compiling a TensorRT engine on the GPU it
    will be certified (and served) on is what makes the certificate mean something.
    """
    profile = profile_of(stages)
    if profile is not None:
        return profile_queue(profile)
    for stage in stages:
        if stage.get("settings", {}).get("backend") in _GPU_BACKENDS:
            return Queue.GPU.value
        settings = stage.get("settings", {})
        if settings.get("device") == "cuda" or settings.get("providers") == "cuda":
            return Queue.GPU.value
        if settings.get("precision") in _GPU_PRECISIONS:  # Model Optimizer calibrates on a GPU
            return Queue.GPU.value
    return Queue.CPU.value
