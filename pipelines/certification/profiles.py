"""Hardware profiles: where an engine runs, as a worker reports it.

A profile is one runtime on one kind of device: the runtime and its version, the device's name,
and what decides whether an engine built elsewhere runs here (compute capability for GPUs, the
instruction-set flags for CPUs), with the driver and CUDA versions. A TensorRT engine runs only
with the TensorRT version and compute capability it was built for, so a certificate is for one
profile.

The profile's ``key`` names the hardware and runtime but not the runtime's version: when a worker
reports a new onnxruntime or TensorRT version on the same hardware, the profile keeps its key and
its ``backend_version`` changes, which is what makes older certificates for it stop being valid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.core import ModelFormat

__all__ = [
    "RUNTIME_FOR_FORMAT",
    "HardwareProfile",
    "cards_of",
    "compatibility_problem",
    "cpu_model",
    "detect_profiles",
]

# The runtime that serves each format: the ``backend`` of the profiles it can be certified on.
RUNTIME_FOR_FORMAT: dict[str, str] = {
    ModelFormat.ONNX.value: "onnxruntime",
    ModelFormat.TORCHSCRIPT.value: "torch",
    ModelFormat.AOTINDUCTOR.value: "torch",
    ModelFormat.TENSORRT.value: "tensorrt",
    # Language models: checkpoints and adapters run on torch (transformers), ONNX Runtime GenAI
    # folders on onnxruntime's profile (its GenAI layer is not a profile of its own). The text
    # runtimes run on the CPU: they are certified on CPU profiles only.
    ModelFormat.HF_CHECKPOINT.value: "torch",
    ModelFormat.LORA_ADAPTER.value: "torch",
    ModelFormat.ORT_GENAI.value: "onnxruntime",
}
# The formats above that the platform's text runtimes run, on the CPU only.
CPU_ONLY_FORMATS = frozenset(
    {ModelFormat.HF_CHECKPOINT.value, ModelFormat.LORA_ADAPTER.value, ModelFormat.ORT_GENAI.value}
)

# CPU flags that change which kernels a runtime picks (and so whether numbers carry over).
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
    "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "sve", "sve2",
)  # fmt: skip

KEY_MAX = 80


@dataclass(frozen=True)
class HardwareProfile:
    """One runtime on one kind of device."""

    backend: str  # "onnxruntime", "torch" or "tensorrt"
    backend_version: str
    device_kind: str  # "cpu" or "cuda"
    device_name: str  # the CPU model, or the GPU's name
    compute_capability: str = ""  # GPUs: "9.0"
    isa: tuple[str, ...] = ()  # CPUs: the flags in ISA_FLAGS this CPU has
    driver_version: str = ""
    cuda_version: str = ""
    total_memory_mb: float = 0.0  # the device's memory: RAM for a CPU, the GPU's for CUDA
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> str:
        """A stable name for the hardware and runtime (not its version), safe as a queue name."""
        identity = "|".join(
            [self.backend, self.device_kind, self.device_name, self.compute_capability,
             ",".join(self.isa)]
        )  # fmt: skip
        digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
        device = re.sub(r"[^a-z0-9]+", "-", self.device_name.lower()).strip("-")
        device = re.sub(r"-(r|tm|cpu|processor|with|radeon-graphics)(?=-|$)", "", device)
        prefix = f"{self.backend}-{self.device_kind}"
        room = KEY_MAX - len(prefix) - len(digest) - 2
        return f"{prefix}-{device[:room].strip('-')}-{digest}" if device else f"{prefix}-{digest}"

    @property
    def label(self) -> str:
        """A line for people: "onnxruntime 1.31.1 on Intel Xeon (cpu, avx2)"."""
        where = self.device_name or self.device_kind
        detail = f"sm {self.compute_capability}" if self.compute_capability else self.device_kind
        return f"{self.backend} {self.backend_version} on {where} ({detail})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["isa"] = list(self.isa)
        data["key"] = self.key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareProfile:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["isa"] = tuple(values.get("isa") or ())
        values["extra"] = dict(values.get("extra") or {})
        return cls(**values)


def compatibility_problem(
    profile: HardwareProfile, fmt: str, meta: dict[str, Any] | None = None
) -> str | None:
    """Why an engine of format ``fmt`` (with its compile ``meta``) cannot run on ``profile``.

    None when it can. TensorRT engines are bound to the compute capability (and, unless built
    version-compatible, the TensorRT version) they were built with; AOTInductor packages to the
    device kind they were compiled for.
    """
    meta = meta or {}
    runtime = RUNTIME_FOR_FORMAT.get(fmt)
    if runtime is None:
        return f"{fmt} models cannot be certified (no runtime serves them)"
    if profile.backend != runtime:
        return f"a {fmt} model runs on {runtime}, and profile {profile.key} is {profile.backend}"
    if fmt in CPU_ONLY_FORMATS and profile.device_kind != "cpu":
        return (
            f"a {fmt} model is run by the platform's text runtime on the CPU, and profile "
            f"{profile.key} is {profile.device_kind}: certify it on a CPU profile"
        )
    if fmt == ModelFormat.AOTINDUCTOR.value:
        device = str(meta.get("device", "cpu"))
        if device != profile.device_kind:
            return (
                f"this package was compiled for {device}; profile {profile.key} is "
                f"{profile.device_kind}"
            )
    if fmt == ModelFormat.TENSORRT.value:
        device = meta.get("device") if isinstance(meta.get("device"), dict) else {}
        built_cc = str(device.get("compute_capability") or meta.get("compute_capability") or "")
        hardware_compatible = bool((meta.get("flags") or {}).get("hardware_compatible"))
        if built_cc and built_cc != profile.compute_capability and not hardware_compatible:
            return (
                f"this engine was built for compute capability {built_cc}; profile {profile.key} "
                f"is {profile.compute_capability or 'unknown'}"
            )
        built_trt = str(meta.get("tensorrt_version") or "")
        version_compatible = bool((meta.get("flags") or {}).get("version_compatible"))
        if built_trt and built_trt != profile.backend_version and not version_compatible:
            return (
                f"this engine was built with TensorRT {built_trt}; profile {profile.key} runs "
                f"TensorRT {profile.backend_version} (rebuild it, or build it version-compatible)"
            )
    return None


# -- detection -------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    for line in _cpuinfo_lines():
        if line.startswith("model name") or line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cards_of(profile: HardwareProfile) -> tuple[int, str]:
    """How many "cards" a profile's throughput is divided by, and what one is.

    A CUDA profile runs an engine on one GPU: 1 "GPU". A CPU profile runs on every core of the
    machine, so its card is a CPU socket (the distinct ``physical id`` values of this machine's
    /proc/cpuinfo, where the check runs; 1 when it does not say).
    """
    if profile.device_kind == "cuda":
        return 1, "GPU"
    sockets = {
        line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("physical id")
    }
    return max(len(sockets), 1), "CPU socket"


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _isa() -> tuple[str, ...]:
    for line in _cpuinfo_lines():
        if line.startswith("flags") or line.startswith("Features"):
            present = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in ISA_FLAGS if flag in present)
    return ()


def _ram_mb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return 0.0


def _cpu_profiles() -> list[HardwareProfile]:
    common = {
        "device_kind": "cpu",
        "device_name": cpu_model(),
        "isa": _isa(),
        "total_memory_mb": round(_ram_mb(), 1),
        "extra": {"machine": platform.machine(), "cpus": str(os.cpu_count() or 0)},
    }
    found = []
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    if ort:
        found.append(HardwareProfile(backend="onnxruntime", backend_version=ort, **common))
    torch_version = _version("torch")
    if torch_version:
        found.append(HardwareProfile(backend="torch", backend_version=torch_version, **common))
    return found


def _gpu_profiles() -> list[HardwareProfile]:
    """One profile per runtime for the first CUDA GPU, where torch sees one."""
    if not os.path.exists("/proc/driver/nvidia") and not os.path.exists("/dev/nvidiactl"):
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        cuda = str(torch.version.cuda or "")
    except Exception:
        return []
    from pipelines.backends.tensorrt_device import nvidia_driver_version

    common = {
        "device_kind": "cuda",
        "device_name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver_version": nvidia_driver_version() or "",
        "cuda_version": cuda,
        "total_memory_mb": round(props.total_memory / 2**20, 1),
    }
    found = [HardwareProfile(backend="torch", backend_version=str(torch.__version__), **common)]
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            found.append(
                HardwareProfile(
                    backend="onnxruntime", backend_version=onnxruntime.__version__, **common
                )
            )
    except ImportError:
        pass
    from pipelines.backends import tensorrt_reason

    if tensorrt_reason() is None:
        import tensorrt

        found.append(
            HardwareProfile(backend="tensorrt", backend_version=tensorrt.__version__, **common)
        )
    return found


def detect_profiles() -> list[HardwareProfile]:
    """Every profile this machine offers: its CPU runtimes, and its GPU's where it has one."""
    return _cpu_profiles() + _gpu_profiles()
