"""What this machine's NVIDIA GPUs are doing now, read through NVML (nvidia-ml-py's ``pynvml``).

Workers sample on every beat and store the sample on their ``Worker`` row; the web process's
``/metrics`` exposes it. Without a driver or a GPU (or without nvidia-ml-py) the sample is an
empty list: sampling never raises, because a failed sample must not stop a worker's beat.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
# NVML is initialised once per process and kept: nvmlInit is reference-counted and slow enough
# (tens of milliseconds) not to repeat on every beat. A failure is not remembered, so a driver
# that appears later is picked up; a failed dlopen costs next to nothing.
_initialised = False


@dataclass(frozen=True)
class GpuSample:
    index: int  # NVML's index (PCI bus order), the ``gpu`` label of the metrics
    uuid: str
    name: str
    # The fraction of the last sample period a kernel ran, 0..1; None where the device does not
    # say (MIG instances). Not NaN: PostgreSQL's jsonb refuses it.
    utilization: float | None
    memory_used_bytes: int
    memory_total_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_gpus() -> list[GpuSample]:
    """One sample per GPU this process may use; [] without NVML, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        with _lock:
            _ensure_init(pynvml)
            count = pynvml.nvmlDeviceGetCount()
            samples = [_sample(pynvml, i) for i in range(count)]
    except Exception as exc:  # noqa: BLE001 - NVMLError, or a driver in a bad state: no sample
        log.debug("no GPU sample: %s", exc)
        return []
    return [s for s in samples if _visible(s)]


def _ensure_init(pynvml: Any) -> None:
    global _initialised
    if not _initialised:
        pynvml.nvmlInit()
        _initialised = True


def _sample(pynvml: Any, index: int) -> GpuSample:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    utilization: float | None
    try:
        utilization = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except pynvml.NVMLError:
        # Some devices (MIG instances) do not report utilisation; memory is still worth having.
        utilization = None
    return GpuSample(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        utilization=utilization,
        memory_used_bytes=int(memory.used),
        memory_total_bytes=int(memory.total),
    )


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes.
    return value.decode() if isinstance(value, bytes) else str(value)


def _visible(sample: GpuSample) -> bool:
    """Whether CUDA_VISIBLE_DEVICES lets this process use the GPU (NVML itself ignores it).

    Entries are NVML indexes or UUIDs (``GPU-...``, prefixes allowed as CUDA allows them).
    Indexes are read in PCI bus order, NVML's: set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so CUDA
    numbers devices the same way, or pin by UUID.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return True
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit() and int(entry) == sample.index:
            return True
        if entry.startswith("GPU-") and sample.uuid.startswith(entry):
            return True
    return False
