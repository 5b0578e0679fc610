"""`./r1 up` as a newcomer runs it: quiet console, the banner last, and a pool that serves."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_is_quiet_seeds_and_serves_the_demo_pool(tmp_path):
    port, mlflow_port, serve_port = free_port(), free_port(), free_port()
    # The embedded default under a fresh R1_HOME, as on a newcomer's laptop.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "MLFLOW_TRACKING_URI", "MLFLOW_UI_URL"}
        and not k.startswith("R1_")
        and k != "DJANGO_SETTINGS_MODULE"
    }
    env |= {"R1_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    console = tmp_path / "console.txt"
    cmd = [
        sys.executable, "manage.py", "up", "--port", str(port),
        "--mlflow-port", str(mlflow_port), "--serve-port", str(serve_port),
    ]  # fmt: skip
    with open(console, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        started = time.monotonic()
        while "Ctrl-C stops everything" not in console.read_text():
            assert proc.poll() is None, console.read_text()
            assert time.monotonic() - started < 300, console.read_text()
            time.sleep(1)
        text = console.read_text()
        lines = [line for line in text.splitlines() if line.strip()]
        # One line per service, one per step, then the banner: no Celery, kombu or MLflow chatter.
        assert len(lines) <= 25, text
        assert not re.search(r"celery@|kombu|WARNING|Traceback|development server", text), text
        for name in ("web", "worker", "beat", "mlflow", "serve"):
            assert re.search(rf"^started {name}\s+\(pid \d+\)$", text, re.M), (name, text)
            assert (tmp_path / "home" / "logs" / f"{name}.log").exists()
        assert re.search(r"^seeding the demo .*: \d+ s$", text, re.M), text
        assert text.rstrip().endswith("Ctrl-C stops everything.")
        assert f"http://127.0.0.1:{serve_port}/v2/models/<model>/infer" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{serve_port}/v2/health/live") as r:
            assert r.status == 200
        worker_log = (tmp_path / "home" / "logs" / "worker.log").read_text()
        assert "ready." in worker_log
    finally:
        if proc.poll() is None:
            # Ctrl-C, and an impatient second one while it stops: the stop still finishes.
            proc.send_signal(signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pids = [
            int(p) for p in re.findall(r"^started \w+\s+\(pid (\d+)\)$", console.read_text(), re.M)
        ]
        left = [pid for pid in pids if _alive(pid)]
        for pid in left:
            os.killpg(pid, signal.SIGKILL)
    assert proc.returncode == 0, console.read_text()[-3000:]
    assert "stopping..." in console.read_text() and "Traceback" not in console.read_text()
    assert not left, f"services left running after the stop: {left}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie the supervisor did not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
