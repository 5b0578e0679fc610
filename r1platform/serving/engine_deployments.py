"""A language-model deployment served by engine servers: its replicas, the proxy, its state.

This is the seam with the serving runtime. For a text-generation deployment on a pool whose
``text_engine`` is ``vllm`` or ``trtllm``, the runtime (in its poller thread) builds an
:class:`EngineDeployment` with :meth:`EngineDeployment.for_spec` and calls ``start()`` instead of
loading an engine in process; then

* ``ready`` / ``reason``: whether any replica answers, else why not (starting for how long, or
  failed with the engine's last log lines): the model's 503 says it, and a failure stays with
  this model (another process), never the pool's others;
* ``wait_ready(timeout)``: for a hot swap, the new version's servers are started beside the
  serving ones and swapped in once ready (a new version that never gets ready leaves the old one
  serving, as a failed load does);
* ``await forward(spec, route, body)``: the OpenAI route's body, after the team-token check and
  the model lookup (``spec``: the base's or an adapter's deployment), answered by a replica;
* ``await close()``: on retire or shutdown, after the requests in flight ended.

Replicas: ``settings.replicas`` local engine servers (one per GPU while there are enough) plus
``settings.remote_urls``. LoRA adapters over the base (``adapters``: each adapter deployment's
model name and folder) are served by the base's servers, by the model name the requests use,
without a second copy of the base; ``add_adapter`` loads one promoted later into running vLLM
servers (``POST /v1/load_lora_adapter``), else the caller starts the deployment again with it.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings
from starlette.responses import Response

from r1platform.serving.engine_servers import (
    VLLM,
    EngineConfigError,
    EngineServerSpec,
    EngineSettings,
    LoraModule,
    replica_specs,
)
from r1platform.serving.engine_supervisor import READY, EngineServer, RemoteServer, Replica
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats
from r1platform.serving.upstream import UpstreamProxy, error_response


class EngineDeployment:
    """One deployment's engine servers behind the serving process (see the module docstring)."""

    def __init__(
        self,
        spec: ModelSpec,
        replicas: list[Replica],
        metrics: ServingMetrics,
        stats: ServingStats,
        *,
        upstream_model: str,
        adapters: Mapping[str, str] | None = None,
        specs: list[EngineServerSpec] | None = None,
    ) -> None:
        self.spec, self.replicas = spec, replicas
        self.upstream_model = upstream_model
        # The client's model name -> the engine's, for the adapters served over this base.
        self.adapters = dict(adapters or {})
        # Local replicas' commands, read at each (re)start: changed in place by add_adapter.
        self.specs = specs if specs is not None else []
        self.proxy = UpstreamProxy(replicas, metrics, stats)

    @classmethod
    def for_spec(
        cls,
        spec: ModelSpec,
        settings: EngineSettings,
        metrics: ServingMetrics,
        stats: ServingStats,
        *,
        adapters: Mapping[str, Path | str] | None = None,
        work_dir: Path | None = None,
        remote_api_key: str = "",
    ) -> EngineDeployment:
        """The engine servers of ``spec``'s model folder (EngineConfigError: cannot be served so).

        Logs go to ``<work_dir>/<team>-<model>-v<version>-r<revision>/replica-<i>.log``
        (``work_dir``: ``R1_WORK_DIR/serving/engines``).
        """
        if not Path(spec.artifact.path).is_dir():
            raise EngineConfigError(f"{spec.artifact.path} is not a model folder")
        specs = replica_specs(settings, spec.artifact.path, spec.name, adapters)
        root = work_dir or Path(django_settings.R1_WORK_DIR) / "serving" / "engines"
        folder = root / _safe(f"{spec.team}-{spec.name}-v{spec.version}-r{spec.revision}")
        key = secrets.token_urlsafe(24)  # only this process can call its engines
        replicas: list[Replica] = []
        for i, server in enumerate(specs):
            headers = {"Authorization": f"Bearer {key}"} if server.engine == VLLM else {}
            replicas.append(
                EngineServer(
                    f"{spec.label} v{spec.version} replica {i}",
                    _command(specs, i),
                    folder / f"replica-{i}.log",
                    env=server.env(key),
                    health_path=server.health_path,
                    headers=headers,
                    startup_timeout=settings.startup_timeout,
                )
            )
        for j, url in enumerate(settings.remote_urls):
            headers = {"Authorization": f"Bearer {remote_api_key}"} if remote_api_key else {}
            replicas.append(RemoteServer(f"{spec.label} remote {j}", url, headers=headers))
        return cls(
            spec,
            replicas,
            metrics,
            stats,
            upstream_model=specs[0].upstream_model if specs else spec.name,
            adapters={name: name for name in (adapters or {})},
            specs=specs,
        )

    # -- state -------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(replica.state == READY for replica in self.replicas)

    @property
    def reason(self) -> str:
        """Why no replica answers ("" when one does)."""
        if self.ready:
            return ""
        return "; ".join(r.reason for r in self.replicas) or "it has no engine server"

    def replica_states(self) -> list[dict[str, Any]]:
        """Each replica: name, state, URL, requests in flight and sent (the pool page, tests)."""
        return [
            {
                "name": route.replica.name,
                "state": route.replica.state,
                "url": route.replica.base_url,
                "in_flight": route.in_flight,
                "sent": route.sent,
            }
            for route in self.proxy.routes
        ]

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every replica (returns at once)."""
        for replica in self.replicas:
            replica.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait (poller thread, never the loop) until every local replica is ready or has given
        up, or ``timeout``; then whether any replica answers."""
        deadline = time.monotonic() + timeout
        local = [r for r in self.replicas if isinstance(r, EngineServer)]
        while any(r.state != READY and not r.given_up for r in local):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return self.ready

    async def close(self) -> None:
        """Stop the replicas (SIGTERM, then SIGKILL) and close the proxy's connections."""
        await self.proxy.close()
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in self.replicas))

    # -- requests ----------------------------------------------------------------------------------

    async def forward(self, spec: ModelSpec, route: str, body: dict[str, Any]) -> Response:
        """The request for ``spec``'s model (this base, or an adapter served over it)."""
        if spec.name == self.spec.name and spec.team_id == self.spec.team_id:
            upstream = self.upstream_model
        elif spec.name in self.adapters:
            upstream = self.adapters[spec.name]
        else:
            return error_response(404, f"model {spec.name!r} is not served by these engines")
        return await self.proxy.forward(spec, route, body, upstream)

    # -- adapters ----------------------------------------------------------------------------------

    def add_adapter(self, name: str, folder: Path | str) -> bool:
        """Load an adapter into the running vLLM servers (poller thread). False when these
        servers cannot take it without a restart (TensorRT-LLM, LoRA off, a rank over the one
        they started with, a replica refused): start the deployment again with it."""
        module = LoraModule.from_folder(name, folder)
        local = [r for r in self.replicas if isinstance(r, EngineServer)]
        if not self.specs or not self.specs[0].lora_enabled:
            return False
        if module.rank > self.specs[0].lora_rank() or len(local) != len(self.replicas):
            return False
        if any(replica.state != READY for replica in local):
            return False  # one starting now would come up without it
        body = json.dumps({"lora_name": module.name, "lora_path": str(module.path)}).encode()
        for replica in local:
            if not _post(replica, "/v1/load_lora_adapter", body):
                return False
        # Restarts from now on load it at start (the replicas' commands read this list).
        self.specs[:] = [
            replace(s, lora_modules=(*[m for m in s.lora_modules if m.name != name], module))
            for s in self.specs
        ]
        self.adapters[name] = name
        return True


def _command(specs: list[EngineServerSpec], index: int) -> Callable[[int], list[str]]:
    """Replica ``index``'s command line, read at each start (adapters added since included)."""
    return lambda port: specs[index].argv(port)


def _post(replica: EngineServer, path: str, body: bytes) -> bool:
    """Whether ``POST path`` with a JSON body answered 200."""
    parts = urllib.parse.urlsplit(replica.base_url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=120)
    headers = {**replica.headers, "content-type": "application/json"}
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120]
