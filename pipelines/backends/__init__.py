"""Compile backends: which exist, what each takes and makes, and which this worker can run.

:mod:`.catalog` is the light part every process may import; the backends themselves
(:mod:`.aotinductor_build`, :mod:`.tensorrt`, :mod:`.tensorrt_build`) are imported by the compile
stage when it runs. Modules inside this package import :mod:`.catalog`, never this file.
"""

from __future__ import annotations

from pipelines.backends.catalog import (
    AUTO,
    AUTO_ORDER,
    BACKEND_INFO,
    BackendInfo,
    CompiledModel,
    available_backends,
    backends_accepting,
    cache_root_for,
    cuda_reason,
    resolve_backend,
    tensorrt_reason,
)

__all__ = [
    "AUTO",
    "AUTO_ORDER",
    "BACKEND_INFO",
    "BackendInfo",
    "CompiledModel",
    "available_backends",
    "backends_accepting",
    "cache_root_for",
    "cuda_reason",
    "resolve_backend",
    "tensorrt_reason",
]
