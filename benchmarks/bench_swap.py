"""A promotion and a rollback under load, through the real gate: requests sent, failed.

    python benchmarks/bench_swap.py                  # 16 clients, 12 s (about a minute in all)
    python benchmarks/bench_swap.py --clients 32 --seconds 20

Everything is the platform's own, in a temporary R1_HOME: two versions of an MLP (different
weights) are uploaded, each is certified by the real suite in this process (the worker's runner,
``execute_job``, serving contract included), a pool is made on this machine's onnxruntime
profile, version 1 is promoted to production, and ``manage.py serve --pool`` is started as a
child process. Clients then send requests back to back on keep-alive connections; a third of the
way in version 2 is promoted (``deployments.services.promote``, the gate included), two thirds of
the way in it is rolled back. Prints how many requests were sent and failed (any answer but 200,
or no answer), which versions answered in which order, and how long each swap took to show.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def setup_django(home: Path) -> None:
    os.environ["R1_HOME"] = str(home)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def build_mlp(path: Path, seed: int) -> None:
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = {"features": {0: "batch"}, "logits": {0: "batch"}}
        torch.onnx.export(
            model, (torch.randn(2, 64),), str(path), input_names=["features"],
            output_names=["logits"], dynamic_axes=batch, opset_version=17, dynamo=False,
        )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(home: Path):
    from django.contrib.auth import get_user_model

    from gpu_workers.runner import execute_job
    from pipelines.certification.profiles import detect_profiles
    from r1platform.accounts.models import ApiToken, Membership, Team
    from r1platform.certification.services import launch_certification
    from r1platform.core.storage import spool_local_file, store_copy
    from r1platform.deployments import services as deployments
    from r1platform.deployments.models import ServingPool
    from r1platform.registry.services import register_version, upload_model
    from r1platform.workers.services import report_worker

    team = Team.objects.create(name="Bench", slug="bench")
    user = get_user_model().objects.create_user("bench", password="bench-password-1")
    Membership.objects.create(team=team, user=user)
    _, token = ApiToken.issue(user, team, name="bench")
    report_worker("bench@localhost", ["cpu"], detect_profiles())
    profile = next(p for p in detect_profiles() if p.backend == "onnxruntime")
    paths = [home / "mlp1.onnx", home / "mlp2.onnx"]
    for seed, path in enumerate(paths, start=1):
        build_mlp(path, seed)
    first = upload_model(team=team, user=user, name="swap-mlp", task="classification",
                         uploaded=spool_local_file(paths[0]))  # fmt: skip
    # Version 2: other weights (a retrained model), registered as a job would register it.
    relative, sha, size = store_copy(paths[1], kind="models", team_id=team.pk, suffix=".onnx")
    second = register_version(
        first.model, relative_file=relative, sha256=sha, size_bytes=size, format="onnx",
        precision="fp32", inputs=first.inputs, outputs=first.outputs, parent=None, user=user,
    )  # fmt: skip
    versions = [first, second]
    for version in versions:
        cert = launch_certification(
            version=version, profile_key=profile.key, level="performance", user=user
        )
        execute_job(cert.job_id, "bench@localhost")
        cert.refresh_from_db()
        if cert.status != "passed":
            raise SystemExit(f"certification of {version} {cert.status}: {cert.error}")
    pool = ServingPool.objects.create(name="bench", profile_id=profile_row(profile.key))
    model = versions[0].model
    outcome = deployments.promote(
        model=model, version=versions[0], pool=pool, stage="production", actor=user
    )
    assert outcome.status == "promoted", outcome.reason
    return token, user, pool, model, versions


def profile_row(key: str) -> int:
    from r1platform.workers.models import HardwareProfile

    return HardwareProfile.objects.get(key=key).pk


class Load:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.failed: Counter[str] = Counter()
        self.versions: list[tuple[float, str]] = []  # (time, version) at each change seen

    def answered(self, version: str) -> None:
        with self.lock:
            self.sent += 1
            if not self.versions or self.versions[-1][1] != version:
                self.versions.append((time.monotonic(), version))

    def failure(self, why: str) -> None:
        with self.lock:
            self.sent += 1
            self.failed[why] += 1


def client(port: int, token: str, stop_at: float, load: Load) -> None:
    body = json.dumps(
        {"inputs": [{"name": "features", "shape": [1, 64], "datatype": "FP32",
                     "data": [0.5] * 64}]}
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    while time.monotonic() < stop_at:
        try:
            conn.request("POST", "/v2/models/swap-mlp/infer", body, headers)
            response = conn.getresponse()
            payload = response.read()
            if response.status == 200:
                load.answered(json.loads(payload)["model_version"])
            else:
                load.failure(f"HTTP {response.status}: {payload[:120]!r}")
        except (OSError, http.client.HTTPException) as exc:
            load.failure(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.close()


def wait_ready(port: int, token: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request(
                "GET", "/v2/models/swap-mlp/ready", headers={"Authorization": f"Bearer {token}"}
            )
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("the serving process did not get ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="r1-swap-"))
    setup_django(home)
    print("certifying two versions with the real suite...", flush=True)
    token, user, pool, model, (v1, v2) = prepare(home)
    port = free_port()
    env = {**os.environ, "R1_HOME": str(home)}
    server = subprocess.Popen(
        [sys.executable, "manage.py", "serve", "--pool", "bench", "--port", str(port),
         "--poll-seconds", "0.5"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_ready(port, token)
        from r1platform.deployments import services as deployments

        load = Load()
        started = time.monotonic()
        stop_at = started + args.seconds
        threads = [
            threading.Thread(target=client, args=(port, token, stop_at, load))
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        time.sleep(args.seconds / 3)
        promoted_at = time.monotonic()
        outcome = deployments.promote(
            model=model, version=v2, pool=pool, stage="production", actor=user, reason="bench"
        )
        assert outcome.status == "promoted", outcome.reason
        time.sleep(max(0.0, started + 2 * args.seconds / 3 - time.monotonic()))
        rolled_at = time.monotonic()
        outcome = deployments.rollback(model=model, pool=pool, actor=user, reason="bench")
        assert outcome.status == "rolled_back", outcome.reason
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    order = " -> ".join("v" + v for _, v in load.versions)
    promoted = next((t - promoted_at for t, v in load.versions if v == str(v2.number)), None)
    rolled = next(
        (t - rolled_at for t, v in load.versions if t > rolled_at and v == str(v1.number)), None
    )
    print(
        f"\n{args.clients} clients for {args.seconds:g} s; promotion v{v1.number} -> "
        f"v{v2.number} at {promoted_at - started:.1f} s, rollback at {rolled_at - started:.1f} s\n"
    )
    print("| requests sent | failed | QPS | versions answering, in order | swap seen after |")
    print("| ---: | ---: | ---: | --- | --- |")
    failed = sum(load.failed.values())
    print(
        f"| {load.sent} | {failed} | {load.sent / args.seconds:.0f} | {order} | "
        f"promotion {_seconds(promoted)}, rollback {_seconds(rolled)} |"
    )
    for why, count in load.failed.items():
        print(f"  failed {count}: {why}")


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    main()
