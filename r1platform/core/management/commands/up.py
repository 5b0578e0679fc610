"""`manage.py up`: the whole platform on one machine, in the foreground, stopped by Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from r1platform.core.demo import DEMO_PASSWORD, DEMO_USER, seed_demo
from r1platform.monitoring.multiprocess import ENV as METRICS_ENV
from r1platform.monitoring.multiprocess import wipe as wipe_metrics
from r1platform.queues import Queue
from r1platform.workers.services import live_workers

READY_TIMEOUT = 60.0


class Command(BaseCommand):
    help = (
        "Start the dashboard, a Celery worker, beat and MLflow's UI together; "
        "Ctrl-C stops them all."
    )

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000, help="dashboard port (8000)")
        parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (5000)")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--no-demo", action="store_true", help="do not seed the demo data")

    def handle(self, port: int, mlflow_port: int, host: str, no_demo: bool, **options) -> None:
        self.stdout.write(f"R1_HOME is {settings.R1_HOME}")
        call_command("migrate", interactive=False, verbosity=0)
        # Installed explicitly: a shell starting this in the background leaves SIGINT ignored,
        # and a process manager stops it with SIGTERM. Both end in the same orderly stop.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        launched = timezone.now()
        children = self._start(host, port, mlflow_port)
        try:
            self._wait_ready(f"http://{host}:{port}/accounts/login/", children)
            if "mlflow" in children:
                self._wait_ready(f"http://{host}:{mlflow_port}/health", children)
            if not no_demo:
                # After the worker has reported its hardware profiles: the demo certifies on one.
                self._wait_worker(children, launched)
                self.stdout.write("seeding the demo team, user and model (trained here, ~10 s)...")
                seed_demo()
            self._banner(host, port, mlflow_port, "mlflow" in children)
            self._supervise(children)
        except KeyboardInterrupt:
            self.stdout.write("\nstopping...")
        finally:
            _stop_all(children)

    def _start(self, host: str, port: int, mlflow_port: int) -> dict[str, subprocess.Popen]:
        py = sys.executable
        root = Path(settings.BASE_DIR)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # One machine, one PID namespace: web, worker and beat share one metrics folder, wiped
        # here as prometheus-client requires (an earlier run's files would add to this one's).
        metrics_dir = Path(settings.R1_HOME) / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        wipe_metrics(metrics_dir, recursive=True)
        env[METRICS_ENV] = str(metrics_dir)
        queues = [Queue.CPU.value]
        if _has_cuda():
            queues.append(Queue.GPU.value)
        commands = {
            "web": [py, "manage.py", "runserver", f"{host}:{port}", "--noreload"],
            "worker": [
                py, "-m", "celery", "-A", "r1platform", "worker", "-Q", ",".join(queues),
                "-c", "2", "-n", "worker@%h", "--loglevel", "INFO",
            ],
            # Exactly one beat: the reaper every minute and every schedule's ticks.
            "beat": [
                py, "-m", "celery", "-A", "r1platform", "beat", "--loglevel", "INFO",
                "-s", str(Path(settings.R1_HOME) / "celerybeat-schedule"),
            ],
        }  # fmt: skip
        uri = settings.MLFLOW_TRACKING_URI
        if uri.startswith("sqlite:"):
            # The dashboard links to the UI this command starts, on whichever port it was given.
            env.setdefault("MLFLOW_UI_URL", f"http://{host}:{mlflow_port}")
            Path(settings.MLFLOW_ARTIFACT_ROOT).mkdir(parents=True, exist_ok=True)
            commands["mlflow"] = [
                py, "-m", "mlflow", "server", "--backend-store-uri", uri,
                "--default-artifact-root", Path(settings.MLFLOW_ARTIFACT_ROOT).as_uri(),
                "--host", host, "--port", str(mlflow_port), "--workers", "1",
            ]  # fmt: skip
        children = {}
        for name, cmd in commands.items():
            # A session of its own, so Ctrl-C reaches only this supervisor, which then stops
            # the children in order instead of all of them dying at once mid-write.
            children[name] = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
        return children

    def _wait_ready(self, url: str, children: dict[str, subprocess.Popen]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            _check_alive(children)
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise CommandError(f"nothing answered at {url} within {READY_TIMEOUT:.0f} s")

    def _wait_worker(self, children: dict[str, subprocess.Popen], launched: datetime) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            _check_alive(children)
            if live_workers().filter(started_at__gte=launched).exists():
                return
            time.sleep(0.5)
        raise CommandError(f"the worker did not report itself within {READY_TIMEOUT:.0f} s")

    def _banner(self, host: str, port: int, mlflow_port: int, mlflow: bool) -> None:
        mlflow_url = os.environ.get("MLFLOW_UI_URL") or (
            f"http://{host}:{mlflow_port}" if mlflow else settings.MLFLOW_UI_URL
        )
        lines = [
            "",
            f"  r1platform dashboard   http://{host}:{port}",
            f"  demo login             {DEMO_USER} / {DEMO_PASSWORD}",
            f"  MLflow UI              {mlflow_url}",
            "  API                    see README (manage.py issue_token demo demo)",
            "  Ctrl-C stops everything.",
            "",
        ]
        self.stdout.write("\n".join(lines))

    def _supervise(self, children: dict[str, subprocess.Popen]) -> None:
        while True:
            _check_alive(children)
            time.sleep(1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_alive(children: dict[str, subprocess.Popen]) -> None:
    for name, proc in children.items():
        if proc.poll() is not None:
            raise CommandError(f"{name} exited with status {proc.returncode}; stopping the rest")


def _stop_all(children: dict[str, subprocess.Popen]) -> None:
    # Each main process first, so Celery does a warm shutdown of its own pool; the whole group
    # is killed only if it has not exited in time.
    for proc in children.values():
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False
