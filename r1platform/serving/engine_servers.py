"""Engine servers for language-model deployments: the exact command that serves one replica.

On a pool whose ``text_engine`` is ``vllm`` or ``trtllm`` the serving process does not decode a
language model itself: it starts the engine's own OpenAI-compatible server per deployment and
replica (``engine_supervisor``), and proxies the team's requests to them (``upstream``), with the
team-token check, routing and metrics in front. This module only says what to run:
:class:`EngineServerSpec` is one replica's server (the model folder, the name it serves, the
pool's limits, the LoRA adapters over that base, the GPUs it sees), and its ``argv`` and ``env``
the command line and environment. Nothing here starts a process.

Written against the engines' documented command lines, and run by ``gpu``-marked tests only:

* **vLLM** (``vllm serve``, as documented for vLLM 0.10/0.11: docs.vllm.ai "OpenAI-Compatible
  Server" and "LoRA Adapters"): ``--host``, ``--port``, ``--served-model-name``,
  ``--max-num-seqs``, ``--gpu-memory-utilization``, ``--max-model-len``,
  ``--tensor-parallel-size``, ``--enable-lora``, ``--max-loras``, ``--max-lora-rank``,
  ``--lora-modules name=path ...``, ``--disable-uvicorn-access-log``; health at ``GET /health``.
  The bearer key it requires on ``/v1`` routes is passed as ``VLLM_API_KEY`` (never in argv,
  where ``ps`` shows it), so only this serving process can call it even on a shared host.
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` is set when LoRA is on, so an adapter promoted later
  loads into the running server (``POST /v1/load_lora_adapter``) without a second base copy.
* **TensorRT-LLM** (``trtllm-serve``, as documented for TensorRT-LLM 1.0: "trtllm-serve"):
  ``MODEL``, ``--host``, ``--port``, ``--backend pytorch``, ``--max_batch_size``,
  ``--max_num_tokens``, ``--max_seq_len``, ``--tp_size``,
  ``--kv_cache_free_gpu_memory_fraction``; health at ``GET /health``. It names the model by its
  ``MODEL`` argument (there is no served-name flag in 1.0), so requests are rewritten to the
  folder's path; it takes no API key, so it listens on loopback only. LoRA adapters are not
  served through it here (its LoRA support goes through an extra YAML of LLM API options that
  no test has run): an adapter over a TensorRT-LLM pool is refused with the reason.

Replicas are spread over the pool's GPUs (``CUDA_VISIBLE_DEVICES`` per replica, ``tensor_parallel``
devices each); replicas that share a device share its memory fraction.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BUILTIN, VLLM, TRTLLM = "builtin", "vllm", "trtllm"
ENGINES = (VLLM, TRTLLM)
LOOPBACK = "127.0.0.1"
HEALTH_PATH = "/health"  # both engines
# vLLM accepts only these as --max-lora-rank (vllm/config/lora.py of 0.10 and 0.11).
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


class EngineConfigError(ValueError):
    """A deployment these engine servers cannot serve as configured; the message says why."""


@dataclass(frozen=True)
class LoraModule:
    """A LoRA adapter served beside its base: requests name it by ``name``."""

    name: str
    path: Path
    rank: int

    @classmethod
    def from_folder(cls, name: str, folder: Path | str) -> LoraModule:
        """The adapter in a peft folder (``adapter_config.json`` says its rank ``r``)."""
        folder = Path(folder)
        config_path = folder / "adapter_config.json"
        try:
            config = json.loads(config_path.read_text())
            rank = int(config["r"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineConfigError(
                f"adapter {name!r}: {config_path} does not give a LoRA rank ('r'): {exc}"
            ) from None
        if "=" in name or not name or name.strip() != name:
            raise EngineConfigError(f"adapter name {name!r} cannot be served (no '=' or spaces)")
        return cls(name=name, path=folder, rank=rank)


@dataclass(frozen=True)
class EngineSettings:
    """A pool's settings for its engine servers (``ServingPool.text_engine`` and friends).

    ``max_num_seqs`` is the pool's ``max_batch_size``: the requests one replica decodes together.
    ``gpus`` are the device ids replicas are spread over (empty: the engine's own default).
    ``remote_urls`` are replicas run elsewhere (another host's engine server, its base URL),
    served beside the local ones. ``lora_slots`` > 0 starts vLLM with LoRA on even before an
    adapter is promoted, so later adapters load at run time.
    """

    engine: str
    replicas: int = 1
    max_num_seqs: int = 32
    max_model_len: int | None = None
    max_num_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    tensor_parallel: int = 1
    gpus: tuple[str, ...] = ()
    remote_urls: tuple[str, ...] = ()
    lora_slots: int = 0
    max_lora_rank: int = 64
    startup_timeout: float = 900.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise EngineConfigError(f"text engine {self.engine!r} is not one of {ENGINES}")
        if self.replicas < 0 or (self.replicas == 0 and not self.remote_urls):
            raise EngineConfigError("an engine deployment needs at least one replica")
        if self.max_num_seqs < 1 or self.tensor_parallel < 1:
            raise EngineConfigError("max_num_seqs and tensor_parallel must be at least 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EngineConfigError("gpu_memory_utilization must be in (0, 1]")

    @classmethod
    def for_pool(
        cls, text_engine: str, engine_replicas: int, max_batch_size: int
    ) -> EngineSettings:
        """A pool's settings (``ServingPool.text_engine``, ``engine_replicas``,
        ``max_batch_size``) on the GPUs this serving process sees."""
        return cls(
            text_engine,
            replicas=engine_replicas,
            max_num_seqs=max_batch_size,
            gpus=visible_gpus(),
        )


@dataclass(frozen=True)
class EngineServerSpec:
    """One replica's engine server: what it serves, within which limits, on which devices."""

    engine: str
    model: Path
    served_name: str
    max_num_seqs: int
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_tokens: int | None = None
    tensor_parallel: int = 1
    lora_modules: tuple[LoraModule, ...] = ()
    lora_slots: int = 0
    max_lora_rank: int = 64
    gpus: tuple[str, ...] = ()
    host: str = LOOPBACK
    health_path: str = HEALTH_PATH

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise EngineConfigError(f"text engine {self.engine!r} is not one of {ENGINES}")
        if self.engine == TRTLLM and (self.lora_modules or self.lora_slots):
            raise EngineConfigError(
                "TensorRT-LLM engine servers here serve no LoRA adapters: merge the adapter "
                "into its base (finetune with merge: true) or serve it on a vLLM pool"
            )

    @property
    def upstream_model(self) -> str:
        """The model name the engine answers to (requests are rewritten to it)."""
        return self.served_name if self.engine == VLLM else str(self.model)

    @property
    def lora_enabled(self) -> bool:
        return self.engine == VLLM and bool(self.lora_modules or self.lora_slots)

    def lora_rank(self) -> int:
        """The smallest rank vLLM accepts that holds every adapter (and ``max_lora_rank``)."""
        slots = [self.max_lora_rank] if self.lora_slots else [1]
        wanted = max([m.rank for m in self.lora_modules] + slots)
        for rank in VLLM_LORA_RANKS:
            if rank >= wanted:
                return rank
        raise EngineConfigError(
            f"a LoRA rank of {wanted} is over vLLM's largest ({VLLM_LORA_RANKS[-1]})"
        )

    def argv(self, port: int) -> list[str]:
        """The engine server's command line, listening on ``port``."""
        return self._vllm(port) if self.engine == VLLM else self._trtllm(port)

    def env(self, api_key: str = "") -> dict[str, str]:
        """What this replica adds to the serving process's environment."""
        added: dict[str, str] = {}
        if self.gpus:
            added["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus)
        if self.engine == VLLM:
            if api_key:
                added["VLLM_API_KEY"] = api_key
            if self.lora_enabled:
                added["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        return added

    def _vllm(self, port: int) -> list[str]:
        argv = ["vllm", "serve", str(self.model), "--host", self.host, "--port", str(port)]
        argv += ["--served-model-name", self.served_name]
        argv += ["--max-num-seqs", str(self.max_num_seqs)]
        argv += ["--gpu-memory-utilization", _fraction(self.gpu_memory_utilization)]
        if self.max_model_len:
            argv += ["--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel > 1:
            argv += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.lora_enabled:
            slots = max(len(self.lora_modules), self.lora_slots, 1)
            argv += ["--enable-lora", "--max-loras", str(slots)]
            argv += ["--max-lora-rank", str(self.lora_rank())]
            if self.lora_modules:
                argv += ["--lora-modules", *(f"{m.name}={m.path}" for m in self.lora_modules)]
        argv.append("--disable-uvicorn-access-log")
        return argv

    def _trtllm(self, port: int) -> list[str]:
        argv = ["trtllm-serve", str(self.model), "--host", self.host, "--port", str(port)]
        argv += ["--backend", "pytorch", "--max_batch_size", str(self.max_num_seqs)]
        if self.max_num_tokens:
            argv += ["--max_num_tokens", str(self.max_num_tokens)]
        if self.max_model_len:
            argv += ["--max_seq_len", str(self.max_model_len)]
        if self.tensor_parallel > 1:
            argv += ["--tp_size", str(self.tensor_parallel)]
        argv += ["--kv_cache_free_gpu_memory_fraction", _fraction(self.gpu_memory_utilization)]
        return argv


@dataclass(frozen=True)
class ReplicaPlacement:
    """Which devices a replica sees, and its share of their memory."""

    gpus: tuple[str, ...] = ()
    memory_fraction: float = 0.9


def place_replicas(
    replicas: int, gpus: Sequence[str], tensor_parallel: int, memory_fraction: float
) -> list[ReplicaPlacement]:
    """Replicas over devices, ``tensor_parallel`` consecutive devices each, round robin: one per
    GPU while there are enough; replicas that share a device split its memory fraction."""
    if not gpus:
        return [ReplicaPlacement((), memory_fraction) for _ in range(replicas)]
    sets = [
        tuple(gpus[(i * tensor_parallel + j) % len(gpus)] for j in range(tensor_parallel))
        for i in range(replicas)
    ]
    users = Counter(device for devices in sets for device in devices)
    return [
        ReplicaPlacement(devices, memory_fraction / max(users[d] for d in devices))
        for devices in sets
    ]


def replica_specs(
    settings: EngineSettings,
    model: Path | str,
    served_name: str,
    adapters: Mapping[str, Path | str] | None = None,
) -> list[EngineServerSpec]:
    """One :class:`EngineServerSpec` per local replica of a deployment (``adapters``: the LoRA
    adapters served over this base, by the model name requests use for each)."""
    modules = tuple(
        LoraModule.from_folder(name, folder) for name, folder in sorted((adapters or {}).items())
    )
    placements = place_replicas(
        settings.replicas, settings.gpus, settings.tensor_parallel, settings.gpu_memory_utilization
    )
    return [
        EngineServerSpec(
            engine=settings.engine,
            model=Path(model),
            served_name=served_name,
            max_num_seqs=settings.max_num_seqs,
            gpu_memory_utilization=placement.memory_fraction,
            max_model_len=settings.max_model_len,
            max_num_tokens=settings.max_num_tokens,
            tensor_parallel=settings.tensor_parallel,
            lora_modules=modules,
            lora_slots=settings.lora_slots,
            max_lora_rank=settings.max_lora_rank,
            gpus=placement.gpus,
        )
        for placement in placements
    ]


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every device NVML
    reports (none without a driver)."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return tuple(d.strip() for d in declared.split(",") if d.strip() and d.strip() != "-1")
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return tuple(str(i) for i in range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return ()


def _fraction(value: float) -> str:
    return f"{value:.4g}"
