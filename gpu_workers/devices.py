"""What this worker runs on: the device a benchmark's numbers belong to."""

from __future__ import annotations

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def describe() -> dict[str, str]:
    """Name, and for GPUs compute capability, of the device this process will use."""
    info = {"host": platform.node(), "cpu": _cpu_model(), "cpu_count": str(os.cpu_count() or 0)}
    try:
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device()
            major, minor = torch.cuda.get_device_capability(index)
            info.update(
                gpu=torch.cuda.get_device_name(index),
                compute_capability=f"{major}.{minor}",
                cuda=str(torch.version.cuda),
            )
    except ImportError:
        pass
    return info


def label() -> str:
    info = describe()
    return info.get("gpu") or info["cpu"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
