"""What a serving process serves, and who may call it: the ``ModelSource`` interface.

The HTTP app never reads the database itself. It is built from a :class:`ModelSource`, which a
background thread polls: ``DeploymentSource`` (``deployments_source.py``) reads a pool's
deployments and the teams' API tokens; :class:`StaticModelSource` holds a list given directly,
for the load benchmark and tests that need no database.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipelines.core import Artifact
from r1platform.accounts.models import hash_token


@dataclass(frozen=True)
class ModelSpec:
    """One model as a pool serves it: which file, on which device, batched how.

    ``revision`` is the deployment's generation: when it (or ``version``) changes, the model is
    loaded again and swapped in. ``sha256`` is checked before the file is loaded ("" skips it).
    """

    team_id: int
    team: str  # the team's slug, for logs and metric labels
    name: str
    version: int
    artifact: Artifact
    sha256: str = ""
    revision: int = 1
    device: str = "cpu"
    max_batch_size: int = 32
    max_queue_delay_ms: float = 5.0
    cache_root: Path | None = None
    # The registry rows served, for the serving history (0 when not from the registry).
    model_id: int = 0
    version_id: int = 0
    # A LoRA adapter's base: the checkpoint it was trained on (None for every other format).
    base: Artifact | None = None
    # What decodes a language model: "builtin" (in this process), "vllm" or "trtllm" (engine
    # servers this process starts and proxies to), and how many of them.
    text_engine: str = "builtin"
    engine_replicas: int = 1

    @property
    def key(self) -> tuple[int, str]:
        """Model names are unique within a team, so (team, name) names a served model."""
        return self.team_id, self.name

    @property
    def label(self) -> str:
        return f"{self.team}/{self.name}"

    @property
    def loaded_as(self) -> tuple[object, ...]:
        """What must change for the model to be loaded again (a pool's settings included)."""
        return (
            self.revision,
            self.version,
            self.device,
            self.max_batch_size,
            self.max_queue_delay_ms,
            self.text_engine,
            self.engine_replicas,
        )


class ModelSource(Protocol):
    """Read from the serving process's poller thread, never from the event loop."""

    def models(self) -> list[ModelSpec]:
        """Every model to serve now."""
        ...

    def token_teams(self) -> dict[str, int]:
        """The team of every API token that may call, keyed by the token's sha256; read from
        the tokens thread (``serving.tokens``) about once a second."""
        ...

    # A source also takes the serving history's closed windows: ``serving.stats.WindowSink``
    # (named there, with its windows, so that this module stays below ``stats``).

    def close(self) -> None:
        """Release what the calling thread held (a database connection)."""
        ...


class StaticModelSource:
    """Models and tokens given directly; ``set_models`` swaps them as a promotion would."""

    def __init__(self, models: Iterable[ModelSpec], tokens: Mapping[str, int]) -> None:
        self._lock = threading.Lock()
        self._models = list(models)
        self._tokens = {hash_token(raw): team for raw, team in tokens.items()}

    def models(self) -> list[ModelSpec]:
        with self._lock:
            return list(self._models)

    def set_models(self, models: Iterable[ModelSpec]) -> None:
        with self._lock:
            self._models = list(models)

    def token_teams(self) -> dict[str, int]:
        return dict(self._tokens)

    def record_windows(self, windows: Sequence[object]) -> None:
        pass  # no database: a static list keeps no serving history

    def close(self) -> None:
        pass
