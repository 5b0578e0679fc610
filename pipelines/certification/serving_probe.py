"""The serving checks' hooks: how the platform's serving runtime answers requests.

The serving runtime belongs to the platform (``r1platform.serving``), which ``pipelines`` never
imports; the platform registers two hooks here instead (the worker's runner does, when it is
imported): a probe, which answers one request (the serving-contract check), and a server, which
serves an engine on loopback for as long as a ``with`` block lasts, so the API-success and QPS
checks can drive it with many requests from another process (a language model's checks, every
one that goes through the serving process, share one server for the whole suite). Without them
(``python -m pipelines run``), those checks report ``not run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipelines.core import Artifact

__all__ = [
    "Endpoint",
    "ProbeResult",
    "ServingProbe",
    "ServingServer",
    "register",
    "register_server",
    "registered",
    "registered_server",
]


@dataclass
class ProbeResult:
    """What the serving runtime did with one request of the declared inputs."""

    runtime: str  # e.g. "r1platform serving (Open Inference Protocol v2)"
    ready: bool  # it loaded the engine and reported the model ready
    metadata_inputs: list[str] = field(default_factory=list)  # as its model metadata lists them
    metadata_outputs: list[str] = field(default_factory=list)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # what the infer call returned
    error: str = ""  # why it did not answer, if it did not


# (the engine's artifact, the device it runs on, one batch of the declared inputs) -> result
ServingProbe = Callable[[Artifact, str, Mapping[str, np.ndarray]], ProbeResult]


@dataclass(frozen=True)
class Endpoint:
    """An engine served on loopback: its model URL and the headers a request needs.

    A language model is called on the server's OpenAI-compatible routes instead
    (``base_url`` + ``/v1/completions``, naming ``model``)."""

    runtime: str
    url: str  # http://127.0.0.1:<port>/v2/models/<name>
    headers: dict[str, str]
    max_batch_size: int
    base_url: str = ""  # http://127.0.0.1:<port>
    model: str = ""  # the name requests give


class ServingServer(Protocol):
    """(the engine's artifact, the device, the largest batch the runtime may gather; a LoRA
    adapter's ``base`` checkpoint) -> a context manager serving it while the block runs (it
    raises RuntimeError when the engine did not load)."""

    def __call__(
        self, artifact: Artifact, device: str, max_batch_size: int, base: Artifact | None = None
    ) -> AbstractContextManager[Endpoint]: ...


_registered: list[ServingProbe] = []
_servers: list[ServingServer] = []


def register(probe: ServingProbe | None) -> None:
    """Make ``probe`` the serving runtime the check uses (None: there is none)."""
    _registered[:] = [probe] if probe is not None else []


def registered() -> ServingProbe | None:
    return _registered[0] if _registered else None


def register_server(server: ServingServer | None) -> None:
    """Make ``server`` the serving runtime the load checks drive (None: there is none)."""
    _servers[:] = [server] if server is not None else []


def registered_server() -> ServingServer | None:
    return _servers[0] if _servers else None
