"""The certification suite's serving hooks: this runtime, on loopback.

Registered with ``pipelines.certification.serving_probe`` by the worker's runner. Both serve the
engine exactly as ``manage.py serve`` would (same app, same loader, dynamic batching on).
:func:`serving_probe` asks for its metadata, sends one Open Inference Protocol request of the
declared inputs and returns what came back, for the serving-contract check to compare with the
engine run directly. :func:`serving_server` keeps it served while a ``with`` block runs, for the
API-success and QPS checks, which drive it from a client process. A language model is served the
same way (its ``ServingEngine`` decodes the requests together); its checks call the endpoint's
``base_url`` on the OpenAI-compatible routes, naming ``model``.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from pipelines.certification.load_client import NUMPY_FOR
from pipelines.certification.serving_probe import Endpoint, ProbeResult
from pipelines.core import Artifact
from pipelines.llm.kinds import is_text_format
from r1platform.serving.app import build_app
from r1platform.serving.protocol import datatype
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import ModelSpec, StaticModelSource

RUNTIME = "r1platform serving (Open Inference Protocol v2)"
TEXT_RUNTIME = "r1platform serving (OpenAI-compatible completions, continuous batching)"
NAME = "certification-probe"
READY_TIMEOUT = 120.0


def serving_probe(artifact: Artifact, device: str, feeds: Mapping[str, np.ndarray]) -> ProbeResult:
    batch = len(next(iter(feeds.values())))
    headers = {"Content-Type": "application/json"}
    try:
        with serving_server(artifact, device, max(batch, 1)) as endpoint:
            headers.update(endpoint.headers)
            metadata = _call(endpoint.url, headers)
            body = {
                "inputs": [
                    {
                        "name": name,
                        "shape": list(array.shape),
                        "datatype": datatype(str(array.dtype)),
                        "data": np.asarray(array).ravel().tolist(),
                    }
                    for name, array in feeds.items()
                ]
            }
            try:
                answer = _call(f"{endpoint.url}/infer", headers, json.dumps(body).encode())
            except RuntimeError as exc:
                return ProbeResult(RUNTIME, ready=True, error=f"the infer request failed: {exc}")
    except RuntimeError as exc:  # it did not start, or the engine did not load
        return ProbeResult(RUNTIME, ready=False, error=str(exc))
    return ProbeResult(
        RUNTIME,
        ready=True,
        metadata_inputs=[t["name"] for t in metadata.get("inputs", [])],
        metadata_outputs=[t["name"] for t in metadata.get("outputs", [])],
        outputs={
            t["name"]: np.asarray(t["data"], dtype=NUMPY_FOR[t["datatype"]]).reshape(t["shape"])
            for t in answer.get("outputs", [])
        },
    )


@contextmanager
def serving_server(
    artifact: Artifact, device: str, max_batch_size: int, base: Artifact | None = None
) -> Iterator[Endpoint]:
    """Serve ``artifact`` on loopback with dynamic batching up to ``max_batch_size`` (a LoRA
    adapter over its ``base`` checkpoint); yield its endpoint once the model is ready
    (RuntimeError with the reason when it did not load)."""
    token = secrets.token_urlsafe(24)
    spec = ModelSpec(
        team_id=0,
        team="certification",
        name=NAME,
        version=1,
        artifact=artifact,
        device=device,
        max_batch_size=max(max_batch_size, 1),
        base=base,
    )
    app = build_app(StaticModelSource([spec], {token: 0}))
    headers = {"Authorization": f"Bearer {token}"}
    runtime = TEXT_RUNTIME if is_text_format(artifact.format) else RUNTIME
    with serving_in_thread(app) as url:
        base = f"{url}/v2/models/{NAME}"
        _wait_ready(f"{url}/v2/health/ready", headers)
        _call(f"{base}/ready", headers)
        yield Endpoint(runtime, base, headers, spec.max_batch_size, base_url=url, model=NAME)


def _wait_ready(url: str, headers: dict[str, str]) -> None:
    """Until the server has read and loaded its models (200), or READY_TIMEOUT."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            _call(url, headers)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _call(url: str, headers: dict[str, str], data: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(f"HTTP {exc.code}: {detail}") from None
    except OSError as exc:
        raise RuntimeError(str(exc)) from None
