"""The serving runtime under load: dynamic batching on and off, beside the engine's own ceiling.

    python benchmarks/bench_serving.py                 # 10 s per mode, 64 clients (~1 minute)
    python benchmarks/bench_serving.py --seconds 3     # a quicker look
    python benchmarks/bench_serving.py --hidden 2048   # a model too small for the HTTP cost

The reference model is an MLP 256 -> 8192 -> 8192 -> 10 exported to ONNX (FP32, dynamic batch,
69 M weights, 276 MB): about 140 MFLOP a row, 2 to 3.5 ms of one core per row in a batch of 32
on the 2-core development machine. One request's HTTP and JSON work costs about 0.4 ms of a core
in the server and 0.1 ms in the client, so the model's compute dominates, and how well the
runtime batches is what shows. (A 2048-wide MLP costs about 0.4 ms of a core per row batched: as
much as its HTTP, so no server could reach 70% of its ceiling on the same two cores.)

1. **Raw ceiling**: the engine (``pipelines.engines.load_engine``, as serving loads it) run back
   to back at the max batch, in this process, while no server runs: rows per second. Measured
   before and after the serving runs; the mean is the ceiling (the machine may be shared).
2. **Serving**: ``manage.py serve``'s app (``r1platform.serving.app.build_app``) over a static
   model list, on uvicorn on loopback in a child process, driven by 64 concurrent clients for
   ``--seconds``, each on its own keep-alive connection (raw HTTP/1.1 over asyncio streams, JSON
   bodies as the protocol's default), once with dynamic batching (max batch 32, 5 ms queue
   delay) and once with ``--no-batching``. A request that does not answer 200 within 10 s is an
   error. Each client's last answer is compared with the engine's own output for its input.

Prints QPS, p50 and p99 latency, errors, the mean batch the engine ran (from ``/metrics``), and
the ratios against the targets: batching / no batching >= 3x, serving / raw ceiling >= 70%, p99
with dynamic batching < 500 ms, no errors. Without batching the mean latency is fixed by Little's
law (64 clients waiting on one engine: 64 / QPS seconds), so that p99 is shown, not judged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN = "bench-token"
MODEL = "mlp"
FEATURES = 256
QPS_RATIO_TARGET = 3.0
CEILING_TARGET = 0.70
P99_TARGET_MS = 500.0
REQUEST_TIMEOUT_S = 10.0


def build_mlp(path: Path, hidden: int) -> None:
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).eval()
    torch.onnx.export(
        model,
        (torch.randn(2, FEATURES),),
        str(path),
        dynamo=False,
        input_names=["features"],
        output_names=["logits"],
        dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
    )


def artifact(path: Path):  # -> pipelines.core.Artifact
    from pipelines.core import Artifact

    return Artifact(
        key=f"{MODEL} v1", path=str(path), format="onnx", precision="fp32", inputs=[], outputs=[]
    )


def raw_ceiling(path: Path, batch: int, seconds: float) -> float:
    """Rows per second of the engine run back to back at ``batch``."""
    from pipelines.engines import load_engine

    engine = load_engine(artifact(path), "cpu")
    feeds = {"features": np.random.default_rng(1).standard_normal((batch, FEATURES), np.float32)}
    for _ in range(5):
        engine.run(feeds)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.run(feeds)
        runs += 1
    return runs * batch / (time.perf_counter() - started)


# -- the server, in a child process ----------------------------------------------------------------


def serve_child(args: argparse.Namespace) -> None:
    os.environ.setdefault("R1_HOME", tempfile.mkdtemp(prefix="r1-bench-serving-"))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
    os.environ.setdefault("R1_LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from r1platform.serving.app import ServingOptions, build_app
    from r1platform.serving.server import serve
    from r1platform.serving.source import ModelSpec, StaticModelSource

    spec = ModelSpec(
        team_id=1,
        team="bench",
        name=MODEL,
        version=1,
        artifact=artifact(Path(args.model)),
        max_batch_size=args.max_batch,
        max_queue_delay_ms=args.delay_ms,
    )
    source = StaticModelSource([spec], {TOKEN: 1})
    serve(build_app(source, ServingOptions(batching=not args.no_batching)), "127.0.0.1", args.port)


def start_server(model: Path, port: int, batching: bool, args: argparse.Namespace):
    cmd = [
        sys.executable,
        __file__,
        "--child-port",
        str(port),
        "--model",
        str(model),
        "--max-batch",
        str(args.max_batch),
        "--delay-ms",
        str(args.delay_ms),
    ]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=1) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become ready in 60 s")


def mean_batch(port: int) -> float:
    # A team token sees its own models' series (the metrics token would see every one).
    scrape = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(scrape, timeout=5) as answer:
        text = answer.read().decode()
    total = re.search(r"^r1_serving_batch_size_sum\{[^}]*\} (\S+)$", text, re.M)
    count = re.search(r"^r1_serving_batch_size_count\{[^}]*\} (\S+)$", text, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return 0.0
    return float(total.group(1)) / float(count.group(1))


# -- the load generator ----------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    last_answers: dict[int, bytes] = field(default_factory=dict)


def request_bytes(row: np.ndarray) -> bytes:
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [1, FEATURES],
                    "datatype": "FP32",
                    "data": row.tolist(),
                }
            ]
        }
    ).encode()
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def client(index: int, port: int, payload: bytes, stop_at: float, load: Load) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(payload)
            try:
                status, body = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
            except (TimeoutError, OSError, ValueError, IndexError) as exc:
                load.errors.append(f"client {index}: {type(exc).__name__} {exc}")
                return
            if status != 200:
                load.errors.append(f"client {index}: HTTP {status} {body[:200]!r}")
                continue
            load.latencies.append(time.perf_counter() - started)
            load.last_answers[index] = body
    finally:
        writer.close()


async def drive(port: int, payloads: list[bytes], seconds: float) -> Load:
    warm = Load()
    warm_stop = time.perf_counter() + 1.0
    await asyncio.gather(*(client(i, port, p, warm_stop, warm) for i, p in enumerate(payloads)))
    load = Load()
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(client(i, port, p, stop_at, load) for i, p in enumerate(payloads)))
    load.errors += warm.errors
    return load


def check_answers(path: Path, rows: np.ndarray, load: Load) -> float:
    """Largest difference between a served answer and the engine's own output for its row."""
    from pipelines.engines import load_engine

    engine = load_engine(artifact(path), "cpu")
    worst = 0.0
    for index, body in load.last_answers.items():
        served = np.asarray(json.loads(body)["outputs"][0]["data"], np.float32)
        expected = engine.run({"features": rows[index : index + 1]})["logits"].ravel()
        worst = max(worst, float(np.abs(served - expected).max()))
    return worst


@dataclass
class Run:
    mode: str
    qps: float
    p50_ms: float
    p99_ms: float
    errors: int
    mean_batch: float
    max_diff: float


def run_mode(model: Path, batching: bool, args: argparse.Namespace, rows: np.ndarray) -> Run:
    port = args.port + (0 if batching else 1)
    payloads = [request_bytes(row) for row in rows]
    proc = start_server(model, port, batching, args)
    try:
        load = asyncio.run(drive(port, payloads, args.seconds))
        batch = mean_batch(port)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    latencies = np.asarray(load.latencies) * 1000
    for error in load.errors[:5]:
        print("  error:", error, file=sys.stderr)
    return Run(
        mode="dynamic batching" if batching else "no batching",
        qps=len(latencies) / args.seconds,
        p50_ms=float(np.percentile(latencies, 50)) if latencies.size else float("nan"),
        p99_ms=float(np.percentile(latencies, 99)) if latencies.size else float("nan"),
        errors=len(load.errors),
        mean_batch=batch,
        max_diff=check_answers(model, rows, load),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per mode")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=8192, help="the MLP's hidden width")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--delay-ms", type=float, default=5.0, help="max queue delay")
    parser.add_argument("--port", type=int, default=18931)
    parser.add_argument("--child-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--no-batching", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_port:
        args.port = args.child_port
        serve_child(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        model = Path(tmp) / "mlp.onnx"
        build_mlp(model, args.hidden)
        before = raw_ceiling(model, args.max_batch, seconds=3.0)
        rows = np.random.default_rng(0).standard_normal((args.clients, FEATURES), np.float32)
        runs = [run_mode(model, True, args, rows), run_mode(model, False, args, rows)]
        after = raw_ceiling(model, args.max_batch, seconds=3.0)
    ceiling = (before + after) / 2

    batched, alone = runs
    print(
        f"\nMLP {FEATURES}->{args.hidden}->{args.hidden}->10 ONNX FP32, {args.clients} clients, "
        f"{args.seconds:g} s per mode, max batch {args.max_batch}, queue delay "
        f"{args.delay_ms:g} ms, {os.cpu_count()} CPUs\n"
    )
    print("| mode | QPS | p50 ms | p99 ms | errors | mean batch | max diff vs engine |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| raw engine, batch {args.max_batch} (ceiling: before {before:.0f}, after "
        f"{after:.0f}) | {ceiling:.0f} | | | | {args.max_batch} | |"
    )
    for r in runs:
        print(
            f"| serving, {r.mode} | {r.qps:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
            f"{r.errors} | {r.mean_batch:.1f} | {r.max_diff:.1e} |"
        )
    speedup = batched.qps / alone.qps if alone.qps else float("inf")
    share = batched.qps / ceiling
    p99 = batched.p99_ms
    errors = sum(r.errors for r in runs)
    print()
    print(
        _verdict(
            "batching / no batching QPS",
            f"{speedup:.2f}x",
            speedup >= QPS_RATIO_TARGET,
            f">= {QPS_RATIO_TARGET:g}x",
        )
    )
    print(
        _verdict(
            "serving (batching) / raw ceiling",
            f"{share:.0%}",
            share >= CEILING_TARGET,
            f">= {CEILING_TARGET:.0%}",
        )
    )
    print(
        _verdict(
            "p99 with dynamic batching",
            f"{p99:.0f} ms",
            p99 < P99_TARGET_MS,
            f"< {P99_TARGET_MS:g} ms",
        )
    )
    print(
        f"- p99 without batching: {alone.p99_ms:.0f} ms (not judged: {args.clients} clients / "
        f"{alone.qps:.0f} QPS = {args.clients / alone.qps * 1000:.0f} ms mean, by Little's law)"
    )
    print(_verdict("errors", str(errors), errors == 0, "0"))


def _verdict(what: str, value: str, met: bool, target: str) -> str:
    return f"- {what}: **{value}** (target {target}: {'met' if met else 'MISSED'})"


if __name__ == "__main__":
    main()
