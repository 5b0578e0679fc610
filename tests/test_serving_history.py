"""The serving history: a pool's serving process writes each model's traffic, errors and latency
as ``ServingWindow`` rows, after real requests through the real app on uvicorn.

The stats thread writes on its own connection, hence ``transactional_db`` (through ``pool``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import requests
from django.db import OperationalError

from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.deployments_source import DeploymentSource
from r1platform.serving.models import ServingWindow
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from r1platform.serving.stats import (
    ServingStats,
    bucket_bounds,
    histogram_quantile,
    latency_bucket,
)
from tests import test_serving_deployments as served
from tests.test_serving import gather_onnx, spec
from tests.test_serving_deployments import (
    POOL,
    X,
    deploy,
    eventually,
    infer,
    next_version,
    promote,
    upload,
)

# Fixtures of the deployments tests, registered here by name.
pool = served.pool
mlp_v2_onnx = served.mlp_v2_onnx


def gather(url: str, token: str, index: int) -> requests.Response:
    body = {"inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [index]}]}
    headers = {"Authorization": f"Bearer {token}"}
    return requests.post(f"{url}/v2/models/gather/infer", json=body, headers=headers, timeout=30)


def totals(**filters) -> dict[str, int]:
    rows = ServingWindow.objects.filter(**filters)
    return {
        key: sum(getattr(w, key) for w in rows)
        for key in ("requests", "errors_4xx", "errors_5xx", "batches", "batch_rows")
    }


def test_latency_histogram_percentiles_are_within_a_bucket():
    stats = ServingStats()
    model = spec(1, "m", __file__, sha256="")
    latencies = np.random.default_rng(0).uniform(1.0, 100.0, 5000)  # ms
    for ms in latencies:
        stats.observe(model, 200, ms / 1000)
    (window,) = stats.take()
    width = bucket_bounds(50)[1] / bucket_bounds(50)[0]  # every bucket is this ratio wide
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(latencies, q))
        assert exact / width <= window.quantile_ms(q) <= exact * width
    assert histogram_quantile({}, 0.5) is None
    assert latency_bucket(0.0) == 0 and latency_bucket(float("nan")) == 0
    assert latency_bucket(1e9) == latency_bucket(1e12)  # the last bucket takes the slowest


def test_the_serving_process_writes_windows_with_its_requests_errors_and_latency(
    pool, team, user, token, mlp_onnx, tmp_path, settings
):
    settings.R1_SERVING_STATS_SECONDS = 1
    mlp = upload(team, user, "mlp", mlp_onnx)
    deploy(mlp, pool)
    gathered = upload(team, user, "gather", gather_onnx(tmp_path / "gather.onnx"))
    deploy(gathered, pool)
    app = build_app(DeploymentSource(POOL), ServingOptions(poll_seconds=0.2))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        for _ in range(7):
            assert infer(url, token, "mlp", X).status_code == 200
        for _ in range(3):  # features of the wrong width: 400
            assert infer(url, token, "mlp", np.zeros((1, 5), np.float32)).status_code == 400
        assert infer(url, "not-a-token", "mlp", X).status_code == 401  # no model: not counted
        assert gather(url, token, 2).status_code == 200
        assert gather(url, token, 99).status_code == 500  # onnxruntime fails on the index

        # Written by the stats thread every second, not at shutdown.
        eventually(lambda: totals(model=mlp.model)["requests"] == 10, timeout=15)
        eventually(lambda: totals(model=gathered.model)["requests"] == 2, timeout=15)
        # A model served with no traffic still gets its (empty) windows: served, idle.
        idle = ServingWindow.objects.filter(model=mlp.model, requests=0)
        eventually(idle.exists, timeout=15)

    assert totals(model=mlp.model) == {
        "requests": 10,
        "errors_4xx": 3,
        "errors_5xx": 0,
        "batches": 7,
        "batch_rows": 14,  # X has two rows
    }
    assert totals(model=gathered.model)["errors_5xx"] == 1
    assert totals(model=gathered.model)["errors_4xx"] == 0
    busy = ServingWindow.objects.filter(model=mlp.model, requests__gt=0)
    assert {(w.pool.name, w.stage, w.version_id) for w in busy} == {(POOL, "production", mlp.pk)}
    for window in busy:
        assert window.seconds > 0
        assert 0 < window.p50_ms <= window.p95_ms <= window.p99_ms < 30_000
        assert sum(window.latency_histogram.values()) == window.requests


def test_a_window_is_written_per_version_across_a_promotion_and_at_shutdown(
    pool, team, user, token, mlp_onnx, mlp_v2_onnx
):
    v1 = upload(team, user, "mlp", mlp_onnx)
    v2 = next_version(v1, mlp_v2_onnx)
    deployment = deploy(v1, pool)
    # Windows an hour long: what is written comes from the flush at shutdown.
    app = build_app(DeploymentSource(POOL), ServingOptions(poll_seconds=0.2, stats_seconds=3600))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        for _ in range(3):
            assert infer(url, token, "mlp", X).json()["model_version"] == "1"
        promote(deployment, v2)
        eventually(lambda: infer(url, token, "mlp", X).json()["model_version"] == "2")
        assert not ServingWindow.objects.exists()

    by_version = {w.version_id: w.requests for w in ServingWindow.objects.all()}
    assert by_version[v1.pk] >= 3 and by_version[v2.pk] >= 1
    assert totals()["requests"] == sum(by_version.values())


def test_a_failed_write_fails_no_request_and_its_counts_go_into_the_next_window(
    pool, team, user, token, mlp_onnx, monkeypatch
):
    v1 = upload(team, user, "mlp", mlp_onnx)
    deploy(v1, pool)
    app = build_app(DeploymentSource(POOL), ServingOptions(poll_seconds=0.2, stats_seconds=3600))
    flusher = app.state.stats_flusher
    real_bulk_create = ServingWindow.objects.bulk_create

    def database_down(*args, **kwargs):
        raise OperationalError("could not connect to server: Connection refused")

    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        first_request = time.time()
        for _ in range(4):
            assert infer(url, token, "mlp", X).status_code == 200
        monkeypatch.setattr(ServingWindow.objects, "bulk_create", database_down)
        assert flusher.flush() is False  # logged, counts kept
        for _ in range(3):  # while the database is down: still answered
            assert infer(url, token, "mlp", X).status_code == 200
        assert flusher.flush() is False
        assert not ServingWindow.objects.exists()

        monkeypatch.setattr(ServingWindow.objects, "bulk_create", real_bulk_create)
        assert infer(url, token, "mlp", X).status_code == 200
        assert flusher.flush() is True
        (window,) = ServingWindow.objects.all()
        assert window.requests == 8
        assert window.batches == 8
        assert sum(window.latency_histogram.values()) == 8
        # It spans the windows that were not written: it starts where the first of them did.
        assert window.started_at.timestamp() <= first_request
        assert window.seconds >= time.time() - first_request - 1

    assert ServingWindow.objects.count() == 1  # the shutdown flush had nothing left to write


def test_a_static_model_list_writes_no_history(db, mlp_onnx):
    source = StaticModelSource([spec(1, "mlp", mlp_onnx)], {"static-token": 1})
    app = build_app(source, ServingOptions(poll_seconds=0.2, stats_seconds=3600))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        answer = requests.post(
            f"{url}/v2/models/mlp/infer",
            json={
                "inputs": [
                    {
                        "name": "features",
                        "shape": [2, 16],
                        "datatype": "FP32",
                        "data": X.ravel().tolist(),
                    }
                ]
            },  # fmt: skip
            headers={"Authorization": "Bearer static-token"},
            timeout=30,
        )
        assert answer.status_code == 200
        assert app.state.stats_flusher.flush() is True
    assert not ServingWindow.objects.exists()


@pytest.mark.parametrize("status, kind", [(200, None), (404, "errors_4xx"), (503, "errors_5xx")])
def test_each_answer_is_counted_by_its_status(status, kind):
    stats = ServingStats()
    model = spec(1, "m", __file__, sha256="")
    stats.observe(model, status, 0.002)
    (window,) = stats.take()
    assert window.requests == 1
    assert window.errors_4xx == (kind == "errors_4xx")
    assert window.errors_5xx == (kind == "errors_5xx")
