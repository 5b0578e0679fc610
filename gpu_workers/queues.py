"""The one place that knows queue names and which queue a pipeline needs."""

from __future__ import annotations

from enum import StrEnum


class Queue(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


# Stage settings that can only run on an NVIDIA GPU.
_GPU_BACKENDS = {"tensorrt"}


def queue_for(stages: list[dict]) -> str:
    """The GPU queue if any stage needs a GPU backend, else the CPU queue."""
    for stage in stages:
        if stage.get("settings", {}).get("backend") in _GPU_BACKENDS:
            return Queue.GPU.value
        settings = stage.get("settings", {})
        if settings.get("device") == "cuda" or settings.get("providers") == "cuda":
            return Queue.GPU.value
    return Queue.CPU.value
