"""The device a TensorRT engine is built on: GPU, compute capability, CUDA and driver versions,
and the per-device timing cache's file name.

The timing cache is kept per device profile, ``<cache>/tensorrt/<gpu>-<cc>-trt<version>.cache``,
so a build on one GPU model never reads tactics timed on another. torch is imported when the
device is described; pynvml is optional.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def sanitize(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``: safe in a file name."""
    cleaned = re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-.")
    return cleaned or "unknown"


def timing_cache_filename(gpu: str, compute_capability: str, trt_version: str) -> str:
    """The timing cache's file name for one device profile: ``<gpu>-<cc>-trt<version>.cache``."""
    return sanitize(f"{gpu}-{compute_capability}-trt{trt_version}") + ".cache"


def timing_cache_path(
    cache_root: Path, gpu: str, compute_capability: str, trt_version: str
) -> Path:
    return (
        Path(cache_root) / "tensorrt" / timing_cache_filename(gpu, compute_capability, trt_version)
    )


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version (pynvml, else /proc/driver/nvidia/version), if known."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]+)", text)
    return found.group(1) if found else None


def device_info(index: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, CUDA runtime and driver versions of CUDA device ``index``."""
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return {
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
        "cuda_runtime": torch.version.cuda,
        "nvidia_driver": nvidia_driver_version(),
    }
