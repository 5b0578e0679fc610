"""The backends catalog: which exist, what each takes and makes, which this worker can run.

The compile stage has one interface and several backends (``pipelines.stages.compile.BACKENDS``
maps a name to its compile function). This module is the light part every process may import: it
describes the backends (:data:`BACKEND_INFO`, used by ``validate_pipeline`` in the web process) and
says which of them this worker can run (:func:`available_backends`, :func:`resolve_backend`).
Nothing heavy is imported at import time; :func:`available_backends` imports torch (and
tensorrt, when installed) only when called.

* ``onnxruntime``: ONNX -> ONNX, onnxruntime's optimised graph (CPU, or the CUDA EP).
* ``aotinductor``: TorchScript -> ``.pt2`` package, torch's AOTInductor (CPU, or CUDA).
* ``tensorrt``: ONNX -> TensorRT engine, built in a child process (NVIDIA GPU only).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.core import ModelFormat, PipelineError

__all__ = [
    "AUTO",
    "BACKEND_INFO",
    "BackendInfo",
    "CompiledModel",
    "available_backends",
    "backends_accepting",
    "resolve_backend",
]

AUTO = "auto"


@dataclass(frozen=True)
class BackendInfo:
    """What a backend takes (current artifact formats) and makes, and whether it needs a GPU."""

    name: str
    accepts: tuple[str, ...]
    produces: str
    gpu_only: bool
    summary: str


BACKEND_INFO: dict[str, BackendInfo] = {
    "onnxruntime": BackendInfo(
        "onnxruntime",
        (ModelFormat.ONNX.value,),
        ModelFormat.ONNX.value,
        gpu_only=False,
        summary="onnxruntime's optimised ONNX graph (CPU, or the CUDA execution provider)",
    ),
    "aotinductor": BackendInfo(
        "aotinductor",
        (ModelFormat.TORCHSCRIPT.value,),
        ModelFormat.AOTINDUCTOR.value,
        gpu_only=False,
        summary="a .pt2 package compiled ahead of time by torch's AOTInductor (CPU or CUDA)",
    ),
    "tensorrt": BackendInfo(
        "tensorrt",
        (ModelFormat.ONNX.value,),
        ModelFormat.TENSORRT.value,
        gpu_only=True,
        summary="a TensorRT engine for this GPU model (NVIDIA GPUs only)",
    ),
}

# What "auto" picks, best first: the first one this worker can run.
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "onnxruntime")


@dataclass
class CompiledModel:
    """What a backend made: its file (inside the staging folder) and what to record about it.

    ``inputs``/``outputs`` (TensorSpec lists) are set by backends whose file is not ONNX, where the
    stage cannot read the signature back from the file.
    """

    filename: str
    format: str
    backend: str
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: list[Any] | None = None
    outputs: list[Any] | None = None
    summary: str = ""  # a few words for the stage message, e.g. "extended" or "fp16, batch 1-32"
    precision: str | None = None  # None: the source's precision


def backends_accepting(fmt: str) -> list[str]:
    """The backends that take a model in format ``fmt``."""
    return [name for name, info in BACKEND_INFO.items() if fmt in info.accepts]


def cuda_reason() -> str | None:
    """None if torch sees a CUDA GPU, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    try:
        if torch.cuda.is_available():
            return None
    except Exception as exc:  # a broken driver install raises rather than answering False
        return f"CUDA is unusable ({type(exc).__name__}: {exc})"
    return "no CUDA GPU on this worker"


def _cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor would call (``$CXX``, else g++/clang++/c++), if installed."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def _onnxruntime_reason() -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime: not installed"
    return None


def _aotinductor_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "aotinductor: torch is not installed"
    if _cxx_compiler() is None:
        return "aotinductor: no C++ compiler (g++ or clang++, or $CXX) on this worker"
    return None


def tensorrt_reason() -> str | None:
    # The GPU first: on a CPU-only machine, advice to install TensorRT would lead nowhere.
    cuda = cuda_reason()
    if cuda is not None:
        return f"tensorrt: {cuda} (TensorRT runs only on NVIDIA GPUs)"
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt: not installed (it is the optional extra: pip install 'r1platform[trt]')"
    try:
        importlib.import_module("tensorrt")
    except Exception as exc:  # installed, but its CUDA libraries do not load
        return f"tensorrt: installed but does not import ({type(exc).__name__}: {exc})"
    return None


_CHECKS: dict[str, Callable[[], str | None]] = {
    "onnxruntime": _onnxruntime_reason,
    "aotinductor": _aotinductor_reason,
    "tensorrt": tensorrt_reason,
}


def available_backends() -> dict[str, str | None]:
    """Every backend's name -> None if this worker can run it, else the reason it cannot.

    For example ``{"onnxruntime": None, "aotinductor": None, "tensorrt": "tensorrt: not
    installed (...)"}``. Checked on each call (cheap once torch is imported).
    """
    return {name: check() for name, check in _CHECKS.items()}


def resolve_backend(requested: str, available: Mapping[str, str | None] | None = None) -> str:
    """The backend to compile with: ``requested``, or for "auto" the best this worker has.

    A PipelineError when the requested backend (or every "auto" candidate) cannot run here, with
    the reason.
    """
    status = available_backends() if available is None else available
    if requested == AUTO:
        for name in AUTO_ORDER:
            if status.get(name) is None and name in status:
                return name
        reasons = "; ".join(str(status.get(name)) for name in AUTO_ORDER)
        raise PipelineError(f"no compile backend can run on this worker: {reasons}")
    if requested not in BACKEND_INFO:
        known = ", ".join([AUTO, *BACKEND_INFO])
        raise PipelineError(f"unknown compile backend {requested!r}; known: {known}")
    reason = status.get(requested)
    if reason is not None:
        runnable = [n for n, r in status.items() if r is None]
        alternatives = f"; this worker can run {', '.join(runnable)}" if runnable else ""
        raise PipelineError(f"backend {requested} is not available: {reason}{alternatives}")
    return requested


def cache_root_for(workdir: Path) -> Path:
    """The folder compile caches (Inductor, TensorRT timing caches) live in: beside the jobs."""
    return Path(workdir).parent / "cache"
