"""The checks that drive the serving runtime with many requests: the source's basic criterion
(API call success rate) and its performance criterion (QPS per card).

Both serve the engine with the platform's runtime (``serving_probe.registered_server``: same app,
loader and dynamic batching as ``manage.py serve``, on loopback in the worker) and send requests
from a client process (:mod:`.load_client`), so the client does not share the runtime's
interpreter lock. NOT_RUN where no runtime is registered (``python -m pipelines``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import pipelines.certification._golden as golden_io
from pipelines.certification._checks import (
    SERVING_NOT_RUN,
    peak_memory,
    reset_peak_memory,
    shape_cases,
)
from pipelines.certification._numerics import error_histogram, tolerance_for
from pipelines.certification._state import CheckRecord, NotRun, SuiteState
from pipelines.certification.profiles import cards_of
from pipelines.core import PipelineError, Precision
from pipelines.onnx_io import random_inputs

# INT8 answers are compared by row cosine: dynamically quantized activations depend on the
# other requests a runtime batched with this one.
INT8_MIN_COSINE = 0.99
# QPS counts the requests started after this share of the run: the first ones meet cold caches.
QPS_WARMUP_SHARE = 0.1
MAX_FAILURES_LISTED = 20


def _server(s: SuiteState) -> Any:
    from pipelines.certification.serving_probe import registered_server

    server = registered_server()
    if server is None:
        raise NotRun(SERVING_NOT_RUN)
    return server


def _load_dir(s: SuiteState, name: str) -> Path:
    folder = Path(s.ctx.workdir) / "certify-load" / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _run_client(
    s: Any,
    folder: Path,
    plan: dict[str, Any],
    what: str,
    module: str = "pipelines.certification.load_client",
) -> dict[str, Any]:
    """Run a load client (``module``: the Open Inference Protocol's, or the streaming one of
    language models) on ``plan`` in its own process, relaying its progress. ``s`` is the suite
    state of either family (its ``progress``)."""
    plan_path, result_path = folder / "plan.json", folder / "result.json"
    plan_path.write_text(json.dumps(plan))
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", module]
    process = subprocess.Popen(
        [*command, str(plan_path), str(result_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    total = plan.get("requests")
    for line in process.stdout:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "progress":
            done = int(parts[1])
            fraction = done / total if total else 0.5
            s.progress(min(fraction, 1.0), f"{what}: {done}{f'/{total}' if total else ''} requests")
    stderr = process.stderr.read() if process.stderr else ""
    if process.wait() != 0 or not result_path.is_file():
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        raise PipelineError(f"the load client failed ({process.returncode}): {tail[0]}")
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def _save_payloads(
    folder: Path, payloads: list[dict[str, np.ndarray]], expected: list[dict[str, np.ndarray]]
) -> Path:
    arrays: dict[str, np.ndarray] = {}
    for i, feeds in enumerate(payloads):
        arrays.update({f"p{i}.in.{name}": value for name, value in feeds.items()})
        if i < len(expected):
            arrays.update({f"p{i}.out.{name}": value for name, value in expected[i].items()})
    path = folder / "payloads.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _latency_ms(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    seconds = np.array([o["seconds"] for o in outcomes], dtype=np.float64) * 1000.0
    if seconds.size == 0:
        return {}
    return {
        "p50_ms": round(float(np.percentile(seconds, 50)), 3),
        "p90_ms": round(float(np.percentile(seconds, 90)), 3),
        "p99_ms": round(float(np.percentile(seconds, 99)), 3),
        "p999_ms": round(float(np.percentile(seconds, 99.9)), 3),
        "max_ms": round(float(seconds.max()), 3),
        "mean_ms": round(float(seconds.mean()), 3),
    }


def _failures(outcomes: list[dict[str, Any]], mix: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [o for o in outcomes if o["cause"]]
    # Grouped without the numbers in brackets ("output y differs (normalised error 3.2 > 1)").
    by_cause = Counter(o["cause"].split(" (")[0] for o in failed)
    listed = [
        {"payload": mix[o["payload"]] if o["payload"] < len(mix) else o["payload"],
         "status": o["status"], "cause": o["cause"]}
        for o in failed[:MAX_FAILURES_LISTED]
    ]  # fmt: skip
    return {"by_cause": dict(by_cause.most_common()), "first": listed}


def _tolerances(s: SuiteState, outputs: list[str]) -> dict[str, list[Any]]:
    precision = s.artifact.precision
    rules = {}
    for name in outputs:
        t = tolerance_for(precision, name, s.settings.tolerances)
        rules[name] = [t.atol, t.rtol, t.statistic]
    return rules


def check_api_success(s: SuiteState, c: CheckRecord) -> str:
    """N requests of every covered shape; success = a 200 whose outputs match the engine's."""
    server = _server(s)
    settings, engine = s.settings, s.loaded
    _, cases = shape_cases(s)
    specs = golden_io.batch_first(s.specs)
    payloads = [
        random_inputs(specs, batch, dims, default_dim=1, seed=1000 + i)
        for i, (batch, dims) in enumerate(cases)
    ]
    expected = [engine.run(feeds) for feeds in payloads]
    mix = [{"batch": batch, "dims": dims} for batch, dims in cases]
    folder = _load_dir(s, "api_success")
    int8 = s.artifact.precision == Precision.INT8.value
    with server(s.artifact, s.profile.device_kind, s.batches[2]) as endpoint:
        plan = {
            "url": endpoint.url,
            "headers": endpoint.headers,
            "payloads": str(_save_payloads(folder, payloads, expected)),
            "payload_count": len(payloads),
            "concurrency": settings.api_concurrency,
            "requests": settings.api_requests,
            "verify": True,
            "tolerances": _tolerances(s, list(expected[0])),
            "int8": int8,
            "min_cosine": INT8_MIN_COSINE,
        }
        result = _run_client(s, folder, plan, "API success rate")
    outcomes = result["outcomes"]
    total = len(outcomes)
    succeeded = sum(1 for o in outcomes if not o["cause"])
    rate = succeeded / total if total else 0.0
    latency = _latency_ms(outcomes)
    c.measure("success_rate", round(rate, 6), settings.min_success_rate, ">=")
    c.measure("requests", total, settings.api_requests, ">=")
    c.measure("failures", total - succeeded)
    c.measure("concurrency", result["concurrency"])
    for name in ("p50_ms", "p99_ms", "max_ms"):
        if name in latency:
            c.measure(name, latency[name], unit="ms")
    c.details.update(
        runtime=endpoint.runtime,
        failures=_failures(outcomes, mix),
        latency=latency,
        latency_histogram_s=error_histogram(np.array([o["seconds"] for o in outcomes])),
        mix=mix,
        match_rule=(
            f"row cosine >= {INT8_MIN_COSINE} (INT8)"
            if int8
            else "the parity tolerance of the engine's precision"
        ),
        seconds=round(result["wall_seconds"], 3),
    )
    s.thresholds.update(
        api_requests=settings.api_requests,
        api_concurrency=settings.api_concurrency,
        min_success_rate=settings.min_success_rate,
    )
    causes = c.details["failures"]["by_cause"]
    top = ", ".join(f"{n}x {cause}" for cause, n in list(causes.items())[:3])
    why = f"; failures: {top}" if causes else ""
    return (
        f"{succeeded}/{total} requests succeeded ({rate:.2%}, needs "
        f"{settings.min_success_rate:.1%}) at concurrency {result['concurrency']} over "
        f"{len(cases)} shapes; p50 {latency.get('p50_ms', 0):.3g} ms, p99 "
        f"{latency.get('p99_ms', 0):.3g} ms{why}"
    )


def check_qps(s: SuiteState, c: CheckRecord) -> str:
    """Sustained requests/s through the runtime's dynamic batching, per card, for qps_seconds."""
    server = _server(s)
    settings, engine = s.settings, s.loaded
    batch = settings.qps_request_batch
    problem = engine.batch_problem(batch)
    if problem is not None:
        raise PipelineError(f"qps_request_batch {batch} is {problem}")
    specs = golden_io.batch_first(s.specs)
    payloads = [random_inputs(specs, batch, s.dims, default_dim=1, seed=2000 + i) for i in range(8)]
    folder = _load_dir(s, "qps")
    cards, card = cards_of(s.profile)
    reset_peak_memory(engine)
    with server(s.artifact, s.profile.device_kind, s.batches[2]) as endpoint:
        plan = {
            "url": endpoint.url,
            "headers": endpoint.headers,
            "payloads": str(_save_payloads(folder, payloads, [])),
            "payload_count": len(payloads),
            "concurrency": settings.qps_concurrency,
            "seconds": settings.qps_seconds,
        }
        result = _run_client(s, folder, plan, f"QPS for {settings.qps_seconds:g} s")
    peak, where = peak_memory(engine)
    outcomes = result["outcomes"]
    wall = float(result["wall_seconds"])
    warm = wall * QPS_WARMUP_SHARE
    steady = [o for o in outcomes if o["started"] >= warm]
    ok = sum(1 for o in steady if not o["cause"])
    qps = ok / (wall - warm) if wall > warm else 0.0
    failed = sum(1 for o in outcomes if o["cause"])
    error_rate = failed / len(outcomes) if outcomes else 1.0
    latency = _latency_ms(steady)
    limit = settings.max_memory_fraction * s.profile.total_memory_mb
    c.measure("qps_per_card", round(qps / cards, 2), settings.min_qps_per_card, ">=", "req/s")
    c.measure("qps", round(qps, 2), unit="req/s")
    c.measure("cards", cards, unit=card)
    c.measure("p99_ms", latency.get("p99_ms", float("inf")), settings.p99_budget_ms, "<=", "ms")
    c.measure("error_rate", round(error_rate, 6), settings.max_error_rate, "<=")
    if limit > 0:
        c.measure("peak_memory_mb", round(peak, 1), round(limit, 1), "<=", "MiB")
    else:
        c.measure("peak_memory_mb", round(peak, 1), unit="MiB")
    c.measure("p50_ms", latency.get("p50_ms", 0.0), unit="ms")
    c.measure("requests", len(outcomes))
    c.measure("seconds", round(wall, 2), unit="s")
    c.details.update(
        runtime=endpoint.runtime,
        card=f"{cards} {card}" + ("s" if cards != 1 else ""),
        memory=where,
        latency=latency,
        failures=_failures(outcomes, [{"batch": batch, "dims": s.dims}] * len(payloads)),
        request_batch=batch,
        max_batch_size=endpoint.max_batch_size,
        concurrency=result["concurrency"],
        warmup_seconds=round(warm, 3),
    )
    s.thresholds.update(
        qps_seconds=settings.qps_seconds,
        qps_concurrency=settings.qps_concurrency,
        qps_request_batch=batch,
        min_qps_per_card=settings.min_qps_per_card,
        max_error_rate=settings.max_error_rate,
    )
    plural = "s" if cards != 1 else ""
    return (
        f"{qps / cards:,.0f} requests/s per {card} (needs {settings.min_qps_per_card:g}; "
        f"{qps:,.0f} on {cards} {card}{plural}) over {wall:.1f} s, {result['concurrency']} "
        f"clients, batch {batch} per request, runtime batching up to {endpoint.max_batch_size}; "
        f"p99 {latency.get('p99_ms', 0):.3g} ms, errors {error_rate:.2%}, {where} {peak:.0f} MiB"
    )
