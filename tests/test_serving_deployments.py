"""Serving a pool from the database: deployments, real API tokens, hot swap, `manage.py serve`.

The poller thread reads the test database on its own connection, hence ``transactional_db``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
from django.core.management import CommandError, call_command
from django.db.models import F
from django.utils import timezone
from onnx import numpy_helper

from r1platform.accounts.models import ApiToken
from r1platform.core import storage
from r1platform.deployments.models import Deployment, ServingPool
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import register_version, upload_model
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.deployments_source import DeploymentSource
from r1platform.serving.server import serving_in_thread
from r1platform.workers.models import HardwareProfile
from tests.conftest import ROOT, platform_env
from tests.test_serving import eventually

POOL = "cpu-pool"


@pytest.fixture(scope="module")
def mlp_v2_onnx(tmp_path_factory, mlp_onnx) -> Path:
    """The same network with other weights, so each version's answers differ."""
    model = onnx.load(str(mlp_onnx))
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -1.5, init.name))
    path = tmp_path_factory.mktemp("v2") / "mlp_v2.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture
def pool(transactional_db) -> ServingPool:
    profile = HardwareProfile.objects.create(
        key="onnxruntime-cpu-test",
        backend="onnxruntime",
        backend_version=ort.__version__,
        device_kind="cpu",
        device_name="test cpu",
    )
    return ServingPool.objects.create(
        name=POOL, profile=profile, max_queue_delay_ms=2, max_batch_size=8
    )


def upload(team, user, name: str, path: Path) -> ModelVersion:
    return upload_model(
        team=team,
        user=user,
        name=name,
        task="classification",
        uploaded=storage.spool_local_file(path),
    )


def next_version(previous: ModelVersion, path: Path) -> ModelVersion:
    relative, sha256, size = storage.store_copy(
        path, kind="models", team_id=previous.team_id, suffix=".onnx"
    )
    return register_version(
        previous.model,
        relative_file=relative,
        sha256=sha256,
        size_bytes=size,
        format="onnx",
        precision="fp32",
        inputs=previous.inputs,
        outputs=previous.outputs,
        parent=previous,
    )


def deploy(version: ModelVersion, pool: ServingPool, stage: str = "production") -> Deployment:
    return Deployment.objects.create(
        team_id=version.team_id, model=version.model, pool=pool, stage=stage, version=version
    )


def promote(deployment: Deployment, version: ModelVersion) -> None:
    """What a promotion or rollback leaves in the row: the version, and the generation bumped."""
    Deployment.objects.filter(pk=deployment.pk).update(
        previous_version=F("version"),
        version=version,
        generation=F("generation") + 1,
        updated_at=timezone.now(),
    )


@pytest.fixture
def serve_pool(pool):
    options = ServingOptions(poll_seconds=0.2, metrics_token="scrape")
    app = build_app(DeploymentSource(POOL), options)
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        yield url


def infer(url: str, token: str, model: str, x: np.ndarray, session=requests) -> requests.Response:
    body = {
        "inputs": [
            {
                "name": "features",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return session.post(f"{url}/v2/models/{model}/infer", json=body, headers=headers, timeout=30)


X = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)


def test_it_serves_a_pools_production_deployments_to_their_team_only(
    pool, team, user, token, outsider_token, mlp_onnx, mlp_v2_onnx, request
):
    deploy(upload(team, user, "mlp", mlp_onnx), pool)
    deploy(upload(team, user, "staged", mlp_onnx), pool, stage="staging")
    altered = upload(team, user, "altered", mlp_v2_onnx)
    stored = storage.media_path(altered.file)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")  # one byte changed after upload
    deploy(altered, pool)
    url = request.getfixturevalue("serve_pool")

    answer = infer(url, token, "mlp", X)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"
    assert infer(url, outsider_token, "mlp", X).status_code == 404  # team B: no such model
    assert infer(url, "", "mlp", X).status_code == 401
    assert infer(url, token, "staged", X).status_code == 404  # staging is another process's
    refused = infer(url, token, "altered", X)
    assert refused.status_code == 503
    assert "sha256" in refused.json()["error"]

    # Tokens are cached and refreshed by the poller: a new one works, a deleted one stops.
    fresh, raw = ApiToken.issue(user, team)
    eventually(lambda: infer(url, raw, "mlp", X).status_code == 200)
    fresh.delete()
    eventually(lambda: infer(url, raw, "mlp", X).status_code == 401)


def test_promotion_and_rollback_swap_versions_with_no_failed_request(
    pool, team, user, token, mlp_onnx, mlp_v2_onnx, request
):
    v1 = upload(team, user, "mlp", mlp_onnx)
    deployment = deploy(v1, pool)
    url = request.getfixturevalue("serve_pool")
    expected = {
        str(n): ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(
            None, {"features": X}
        )[0]
        for n, p in ((1, mlp_onnx), (2, mlp_v2_onnx))
    }
    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(8)]
    failures: list[str] = []

    def client(index: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answer = infer(url, token, "mlp", X, session)
                except requests.RequestException as exc:
                    failures.append(f"client {index}: {exc}")
                    continue
                if answer.status_code != 200:
                    failures.append(f"client {index}: {answer.status_code} {answer.text}")
                    continue
                body = answer.json()
                served = np.reshape(body["outputs"][0]["data"], (2, 4))
                if not np.allclose(served, expected[body["model_version"]], atol=1e-5):
                    failures.append(f"client {index}: v{body['model_version']} answered wrong")
                seen[index].append(body["model_version"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(seen))]
    for thread in threads:
        thread.start()
    try:
        eventually(lambda: all(len(s) >= 3 for s in seen))
        v2 = next_version(v1, mlp_v2_onnx)
        promote(deployment, v2)
        eventually(lambda: all(s[-1] == "2" for s in seen))
        marks = [len(s) for s in seen]
        eventually(lambda: all(len(s) >= m + 3 for s, m in zip(seen, marks, strict=True)))
        promote(deployment, v1)  # the rollback
        eventually(lambda: all(s[-1] == "1" for s in seen))
        marks = [len(s) for s in seen]
        eventually(lambda: all(len(s) >= m + 3 for s, m in zip(seen, marks, strict=True)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

    assert failures == []
    for versions in seen:
        # Each client's requests run one after another: once it saw a swap, never the old again.
        runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
        assert runs == ["1", "2", "1"]
    ready = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer scrape"}).text
    assert "r1_serving_models_ready 1.0" in ready


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_serve_command_serves_a_pool_until_it_is_stopped(
    pool, team, user, token, mlp_onnx, settings, tmp_path
):
    deploy(upload(team, user, "mlp", mlp_onnx), pool)
    port = _free_port()
    env = platform_env()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "manage.py", "serve", "--pool", POOL, "--port", str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        eventually(ready, timeout=60)
        answer = infer(url, token, "mlp", X)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    # uvicorn shuts down gracefully, then dies of the signal it caught, as a process should.
    assert code == -signal.SIGTERM, log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_the_serve_command_refuses_an_unknown_pool(db):
    with pytest.raises(CommandError, match="no serving pool 'nope'"):
        call_command("serve", "--pool", "nope")
