"""The serving-contract check's hook: how the platform's serving runtime answers a request.

The serving runtime belongs to the platform (``r1platform.serving``), which ``pipelines`` never
imports; the platform registers a probe here instead (the worker's runner does, when it is
imported). Without one (``python -m pipelines run``), the check reports ``not run``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from pipelines.core import Artifact

__all__ = ["ProbeResult", "ServingProbe", "register", "registered"]


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

_registered: list[ServingProbe] = []


def register(probe: ServingProbe | None) -> None:
    """Make ``probe`` the serving runtime the check uses (None: there is none)."""
    _registered[:] = [probe] if probe is not None else []


def registered() -> ServingProbe | None:
    return _registered[0] if _registered else None
