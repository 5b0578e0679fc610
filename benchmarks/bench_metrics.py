"""/metrics on a large platform history against a small one: p50/p90, queries, bytes and the ratio.

    python benchmarks/bench_metrics.py [--large-jobs 100000] [--large-runs 20000]
        [--large-workers 200] [--scrapes 30] [--rounds 3] [--log-tail 2000] [--keep]

About 90 s on two cores and about 400 MB of disk while it runs; the temporary R1_HOME is removed
at the end unless --keep is given.

Prometheus scrapes every 15 s, so a scrape must stay cheap as jobs and schedule runs pile up.
This builds two SQLite databases in one temporary R1_HOME (nothing else is touched): "small"
(100 jobs, 20 schedule runs, 3 workers) and "large" (100,000 jobs across statuses, stages and
queues, 20,000 schedule runs, 200 workers each with a GPU sample), both with bulk_create. It then
scrapes /metrics through Django's test client, switching the default connection between the two
files, in interleaved rounds (small, large, then large, small, ...), after a warm-up and a
gc.collect() each time. It prints a markdown table (p50/p90 ms, SQL queries per scrape, bytes),
the large/small ratio of p50, each SQL query's own median time with SQLite's query plan, and the
broker probe's time. The broker is the default filesystem transport under the temporary R1_HOME
(local and empty), so the broker part is a cheap constant here; a Redis broker adds a round trip
per queue. prometheus-client's multiprocess mode is off (PROMETHEUS_MULTIPROC_DIR is unset), so
the process part of the answer is this process's own default registry.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

URL = "/metrics"
STAGES = ["finetune", "export_onnx", "quantize", "compile", "benchmark", "evaluate", "certify"]
# Finished jobs dominate a platform's history; queued and running ones are the few now.
STATUS_WEIGHTS = {"succeeded": 80, "failed": 10, "cancelled": 5, "running": 3, "queued": 2}
DECISION_WEIGHTS = {
    "skipped": 50, "kept": 25, "promoted": 10, "requested": 5, "failed": 8, "running": 2
}  # fmt: skip
PROFILE_KEYS = ["onnxruntime-cuda-h100", "tensorrt-h100", "onnxruntime-cpu-avx512", "tensorrt-l4"]


@dataclass
class Size:
    label: str
    jobs: int
    runs: int
    workers: int
    path: Path = field(default_factory=Path)
    times_ms: list[float] = field(default_factory=list)
    round_p50s: list[float] = field(default_factory=list)
    queries: int = 0
    bytes: int = 0
    query_ms: dict[str, list[float]] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = q * (len(ordered) - 1)
    low = int(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-jobs", type=int, default=100)
    parser.add_argument("--small-runs", type=int, default=20)
    parser.add_argument("--small-workers", type=int, default=3)
    parser.add_argument("--large-jobs", type=int, default=100_000)
    parser.add_argument("--large-runs", type=int, default=20_000)
    parser.add_argument("--large-workers", type=int, default=200)
    parser.add_argument("--gpus-per-worker", type=int, default=8)
    parser.add_argument("--log-tail", type=int, default=2000, help="chars of log per finished job")
    parser.add_argument("--scrapes", type=int, default=30, help="timed scrapes per round and size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary R1_HOME")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="r1-bench-metrics-"))
    os.environ["R1_HOME"] = str(home)
    os.environ["DJANGO_SETTINGS_MODULE"] = "r1platform.settings"
    for name in ("PROMETHEUS_MULTIPROC_DIR", "R1_METRICS_TOKEN", "DATABASE_URL"):
        os.environ.pop(name, None)
    os.environ.pop("CELERY_BROKER_URL", None)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone
    from tqdm import tqdm

    from r1platform.accounts.models import Team
    from r1platform.deployments.models import ServingPool
    from r1platform.jobs.models import Job
    from r1platform.monitoring import collectors
    from r1platform.registry.models import ModelVersion, RegisteredModel
    from r1platform.schedules.models import PipelineTemplate, Schedule, ScheduleRun
    from r1platform.workers.models import HardwareProfile, Worker

    def use_db(path: Path) -> None:
        """Point the default connection at another SQLite file (it reconnects on next use)."""
        connection.close()
        connection.settings_dict["NAME"] = str(path)

    def populate(size: Size) -> None:
        use_db(size.path)
        call_command("migrate", verbosity=0)
        rng = random.Random(0)
        now = timezone.now()
        team = Team.objects.create(name="Bench", slug="bench")
        model = RegisteredModel.objects.create(team=team, name="m", task="classification")
        versions = ModelVersion.objects.bulk_create(
            ModelVersion(
                model=model, team=team, number=n, format="onnx", precision="fp32",
                file=f"models/x/{n}.onnx", sha256="0" * 64, size_bytes=1,
            )
            for n in range(1, 51)
        )  # fmt: skip
        RegisteredModel.objects.filter(pk=model.pk).update(latest_version=50)
        profiles = [
            HardwareProfile.objects.create(
                key=key, backend=key.split("-")[0], backend_version="1.0",
                device_kind="cpu" if "cpu" in key else "cuda", device_name=key,
            )
            for key in PROFILE_KEYS
        ]  # fmt: skip
        pool = ServingPool.objects.create(name="pool", profile=profiles[0])
        template = PipelineTemplate.objects.create(
            team=team, name="t", stages=[{"name": s, "settings": {}} for s in STAGES[:4]]
        )
        schedules = [
            Schedule.objects.create(
                team=team, name=f"s{i}", model=model, template=template, dataset_name="d",
                pool=pool, interval_seconds=3600, enabled=i % 3 != 0,
            )
            for i in range(10)
        ]  # fmt: skip

        queues = ["cpu"] * 6 + ["gpu"] * 3 + [f"profile.{rng.choice(PROFILE_KEYS)}"]
        statuses = list(STATUS_WEIGHTS)
        weights = list(STATUS_WEIGHTS.values())
        log_tail = ("step 1234 loss 0.0123 lr 1e-4 | " * (args.log_tail // 32 + 1))[: args.log_tail]
        batch: list[Job] = []
        desc = f"{size.label}: {size.jobs:,} jobs"
        for i in tqdm(range(size.jobs), desc=desc, file=sys.stderr, mininterval=1.0):
            status = rng.choices(statuses, weights)[0]
            stages = rng.sample(STAGES, 4)
            done = rng.randint(0, 3)
            finished = status not in ("queued", "running")
            batch.append(
                Job(
                    team=team, version=versions[i % len(versions)],
                    stages=[{"name": s, "settings": {"batch_sizes": [1, 8, 32]}} for s in stages],
                    status=status, progress=1.0 if finished else done / 4,
                    current_stage="" if status == "queued" and done == 0 else stages[done],
                    stage_results=[{"stage": s, "seconds": 12.5} for s in stages[:done]],
                    log_tail=log_tail if finished else log_tail[: args.log_tail // 4],
                    queue=rng.choice(queues), idempotency_key=f"bench-{i}",
                    worker_host="" if status == "queued" else f"worker-{i % 200:04d}@bench",
                    created_at=now - timedelta(minutes=size.jobs - i),
                )
            )  # fmt: skip
            if len(batch) >= 5000:
                Job.objects.bulk_create(batch, batch_size=1000)
                batch.clear()
        Job.objects.bulk_create(batch, batch_size=1000)

        decisions = list(DECISION_WEIGHTS)
        dweights = list(DECISION_WEIGHTS.values())
        runs = [
            ScheduleRun(
                schedule=schedules[i % len(schedules)], team=team,
                decision=rng.choices(decisions, dweights)[0], reason="the challenger lost by 0.2",
                metric="accuracy", champion_score=0.97, challenger_score=0.968,
                created_at=now - timedelta(minutes=size.runs - i),
            )
            for i in tqdm(range(size.runs), desc=f"{size.label}: runs", file=sys.stderr)
        ]  # fmt: skip
        ScheduleRun.objects.bulk_create(runs, batch_size=1000)

        workers = []
        for i in range(size.workers):
            # 1 in 20 stopped, 2 in 20 lost, the rest live. A live worker's beat is set an hour
            # ahead so it stays live however long the benchmark runs (lost after 60 s otherwise).
            state = "stopped" if i % 20 == 0 else "lost" if i % 20 in (1, 2) else "live"
            seen = now - timedelta(hours=1) if state != "live" else now + timedelta(hours=1)
            gpus = [
                {
                    "index": g, "uuid": f"GPU-{i:04d}-{g}", "name": "NVIDIA H100",
                    "utilization": rng.random(), "memory_used_bytes": rng.randint(0, 80) * 2**30,
                    "memory_total_bytes": 80 * 2**30,
                }
                for g in range(args.gpus_per_worker)
            ]  # fmt: skip
            workers.append(
                Worker(
                    hostname=f"worker-{i:04d}@bench", pid=1000 + i, last_seen=seen,
                    stopped_at=now if state == "stopped" else None, gpus=gpus,
                    queues=["cpu", "gpu", f"profile.{PROFILE_KEYS[i % len(PROFILE_KEYS)]}"],
                )
            )  # fmt: skip
        Worker.objects.bulk_create(workers, batch_size=500)
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.execute("ANALYZE")  # what a long-lived database would have; cheap here

    small = Size("small", args.small_jobs, args.small_runs, args.small_workers)
    large = Size("large", args.large_jobs, args.large_runs, args.large_workers)
    for size in (small, large):
        size.path = home / f"{size.label}.sqlite3"
        populate(size)

    client = Client()

    def scrape() -> bytes:
        response = client.get(URL)
        assert response.status_code == 200, response.status_code
        return response.content

    for r in range(args.rounds):
        order = (small, large) if r % 2 == 0 else (large, small)
        for size in order:
            use_db(size.path)
            for _ in range(args.warmup):
                scrape()
            gc.collect()
            times = []
            for _ in range(args.scrapes):
                start = time.perf_counter()
                scrape()
                times.append((time.perf_counter() - start) * 1000)
            size.times_ms.extend(times)
            size.round_p50s.append(statistics.median(times))

    params_of: dict[str, Any] = {}

    @contextmanager
    def timed_queries(into: dict[str, list[float]]) -> Iterator[None]:
        def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any):
            start = time.perf_counter()
            try:
                return execute(sql, params, many, context)
            finally:
                into.setdefault(sql, []).append((time.perf_counter() - start) * 1000)
                params_of[sql] = params

        with connection.execute_wrapper(wrapper):
            yield

    plans: dict[str, list[str]] = {}
    for size in (small, large):
        use_db(size.path)
        scrape()
        with CaptureQueriesContext(connection) as captured:
            size.bytes = len(scrape())
        size.queries = len(captured)
        gc.collect()
        with timed_queries(size.query_ms):
            for _ in range(10):
                scrape()
        if size is large:
            with connection.cursor() as cursor:
                for sql in size.query_ms:
                    cursor.execute("EXPLAIN QUERY PLAN " + sql, params_of[sql])
                    plans[sql] = [str(row[-1]) for row in cursor.fetchall()]

    # The broker part alone: the probe the collector makes for every known queue.
    probe_queues = sorted({"cpu", "gpu"} | {f"profile.{k}" for k in PROFILE_KEYS})
    probe_ms = []
    for _ in range(20):
        start = time.perf_counter()
        found = collectors.queue_depths(probe_queues)
        probe_ms.append((time.perf_counter() - start) * 1000)
        assert found is not None, "the filesystem broker did not answer"

    print()
    print(f"/metrics, {args.rounds} interleaved rounds x {args.scrapes} scrapes after "
          f"{args.warmup} warm-up, SQLite under {home}")  # fmt: skip
    print()
    print("| registry | jobs | schedule runs | workers | p50 ms | p90 ms | queries | bytes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in (small, large):
        print(
            f"| {s.label} | {s.jobs:,} | {s.runs:,} | {s.workers:,} "
            f"| {statistics.median(s.times_ms):.2f} | {percentile(s.times_ms, 0.9):.2f} "
            f"| {s.queries} | {s.bytes:,} |"
        )
    ratio = statistics.median(large.times_ms) / statistics.median(small.times_ms)
    print()
    print(f"ratio large/small p50: {ratio:.2f}x")
    for s in (small, large):
        print(f"  {s.label} p50 per round: " + ", ".join(f"{v:.2f}" for v in s.round_p50s))
    print()
    print("Each SQL query's median ms over 10 scrapes (query plan from the large database):")
    print()
    print("| query | small ms | large ms | plan (large) |")
    print("| --- | ---: | ---: | --- |")
    for sql, large_times in large.query_ms.items():
        small_times = small.query_ms.get(sql, [float("nan")])
        short = " ".join(sql.split())
        short = short if len(short) <= 110 else short[:107] + "..."
        plan = "; ".join(plans.get(sql, []))
        print(
            f"| `{short}` | {statistics.median(small_times):.2f} "
            f"| {statistics.median(large_times):.2f} | {plan} |"
        )
    print()
    print(
        f"Broker ({settings.CELERY_BROKER_URL}, local and empty here): queue_depths over "
        f"{len(probe_queues)} queues, p50 {statistics.median(probe_ms):.2f} ms; "
        "it is part of every scrape above."
    )
    connection.close()
    if args.keep:
        print(f"Kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
