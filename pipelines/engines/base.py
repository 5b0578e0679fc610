"""What every engine family shares: where it runs, how it is loaded, and the format registry.

An engine family is a way of calling a model. ``tensor`` engines (:mod:`pipelines.engines.tensor`)
take named arrays and return named arrays: classifiers, encoders, vision. A ``generation`` family
(prefill a prompt into a KV cache, then decode token by token, streaming) registers its formats
here the same way, so :func:`pipelines.engines.load_engine` stays the one door and a caller asks
``engine.family`` (or :func:`pipelines.engines.require_family`) instead of testing formats.

Nothing here imports torch, onnxruntime or tensorrt: an engine imports its runtime when it loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core import Artifact, PipelineError


class EngineUnavailable(PipelineError):
    """This engine cannot run on this worker; the message says why."""


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is opened, beyond the artifact and the device.

    ``threads``: intra-op threads (None: ``R1_ENGINE_THREADS`` when set, else the runtime's
    default). ``optimization``: onnxruntime's graph optimisation level at load ("all", the
    default, as when served; "none" to run a graph exactly as written, as a reference does).
    ``cache_root``: the platform's compile cache folder (AOTInductor packages extract there).
    """

    threads: int | None = None
    optimization: str = "all"
    cache_root: Path | None = None

    def thread_count(self) -> int:
        """Threads to ask the runtime for; 0 means the runtime's own default."""
        if self.threads is not None:
            return max(0, int(self.threads))
        return max(0, int(os.environ.get("R1_ENGINE_THREADS", "0") or 0))


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU; torch is not imported where no NVIDIA driver is loaded."""
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def resolve_device(requested: str) -> str:
    """ "cpu" or "cuda" for a device setting ("auto": the GPU when there is one).

    EngineUnavailable for "cuda" on a worker without a CUDA GPU.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"unknown device {requested!r}; use auto, cpu or cuda")
    has_cuda = cuda_available()
    if requested == "cuda" and not has_cuda:
        raise EngineUnavailable("device cuda was asked for but this worker has no CUDA GPU")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


class BaseEngine:
    """A loaded model of any family: what it is, where it runs, and what its calls run inside."""

    family: str = ""
    backend: str = ""
    # Whether the engine allocates CUDA memory through torch (its peak is then measurable).
    torch_cuda: bool = False

    def __init__(self, artifact: Artifact, device: str) -> None:
        self.key = artifact.key
        self.format = artifact.format
        self.device = device

    def context(self) -> AbstractContextManager[Any]:
        """What the calls run inside (no autograd for torch); enter it once around a loop."""
        return contextlib.nullcontext()

    def extra_gpu_bytes(self) -> int:
        """CUDA memory the engine holds outside torch's allocator."""
        return 0


# An engine factory: (artifact, device resolved to "cpu"/"cuda", options) -> engine.
EngineFactory = Callable[[Artifact, str, EngineOptions], BaseEngine]


@dataclass(frozen=True)
class EngineKind:
    family: str
    factory: EngineFactory


_KINDS: dict[str, EngineKind] = {}


def register_engine(fmt: str, family: str, factory: EngineFactory) -> None:
    """Make ``load_engine`` open artifacts of format ``fmt`` with ``factory``."""
    _KINDS[fmt] = EngineKind(family, factory)


def engine_kind(fmt: str) -> EngineKind | None:
    return _KINDS.get(fmt)


def engine_formats(family: str | None = None) -> tuple[str, ...]:
    """The formats an engine can be loaded for (of one family, when given)."""
    return tuple(f for f, kind in _KINDS.items() if family is None or kind.family == family)
