"""The models list at 100,000 versions against the same list at 50: p50 latency and the ratio.

    python benchmarks/bench_model_list.py [--versions 100000] [--requests 40]

It builds its own SQLite registry in a temporary R1_HOME (nothing else is touched), renders the
dashboard's models list through Django's test client as a signed-in member, then bulk-inserts
versions and renders it again. The list reads RegisteredModel.latest_version instead of counting
versions, so the ratio should stay near 1.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()

    os.environ["R1_HOME"] = tempfile.mkdtemp(prefix="r1-bench-")
    os.environ["DJANGO_SETTINGS_MODULE"] = "r1platform.settings"
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext
    from tqdm import tqdm

    from r1platform.accounts.models import Membership, Team
    from r1platform.registry.models import ModelVersion, RegisteredModel

    call_command("migrate", verbosity=0)
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.create_user("bench", password="bench-pw-123")
    team = Team.objects.create(name="Bench", slug="bench")
    Membership.objects.create(team=team, user=user)
    models = [
        RegisteredModel.objects.create(team=team, name=f"model-{i:03d}", task="classification")
        for i in range(args.models)
    ]

    def add_versions(total: int) -> None:
        per_model = total // len(models)
        batch: list[ModelVersion] = []
        for model in tqdm(models, desc=f"inserting {total:,} versions", file=sys.stderr):
            start = model.latest_version
            for n in range(start + 1, start + per_model + 1):
                batch.append(
                    ModelVersion(
                        model=model, team=team, number=n, format="onnx", precision="fp32",
                        file=f"models/x/{model.pk}-{n}.onnx", sha256="0" * 64, size_bytes=1,
                    )
                )  # fmt: skip
            model.latest_version = start + per_model
            RegisteredModel.objects.filter(pk=model.pk).update(latest_version=model.latest_version)
            if len(batch) >= 20_000:
                ModelVersion.objects.bulk_create(batch, batch_size=5000)
                batch.clear()
        ModelVersion.objects.bulk_create(batch, batch_size=5000)

    client = Client()
    client.force_login(user)

    def measure(label: str) -> tuple[float, int]:
        # The inserts leave 100k model objects for the collector; without this the second
        # measurement times Python's garbage collection rather than the page.
        gc.collect()
        client.get("/")  # warm
        times = []
        for _ in range(args.requests):
            start = time.perf_counter()
            response = client.get("/?page=1")
            times.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200
        with CaptureQueriesContext(connection) as queries:
            client.get("/")
        return statistics.median(times), len(queries)

    add_versions(args.models)
    small_ms, small_q = measure("small")
    add_versions(args.versions - args.models)
    total = ModelVersion.objects.count()
    big_ms, big_q = measure("big")

    print(f"{'registry':<28} {'versions':>10} {'p50 ms':>8} {'queries':>8}")
    print(f"{'small':<28} {args.models:>10,} {small_ms:>8.2f} {small_q:>8}")
    print(f"{'large':<28} {total:>10,} {big_ms:>8.2f} {big_q:>8}")
    print(f"ratio large/small p50: {big_ms / small_ms:.2f}x")


if __name__ == "__main__":
    main()
