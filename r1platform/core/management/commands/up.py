"""`manage.py up`: the whole platform on one machine, in the foreground, stopped by Ctrl-C.

Quiet by default: each service's own output (Celery, kombu, MLflow, the development server's
warnings) goes to ``R1_HOME/logs/<service>.log``; the console gets one line per service started,
a progress line while the demo seeds, and the banner last. ``--verbose`` shows everything.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from r1platform.core.demo import DEMO_PASSWORD, DEMO_POOL, DEMO_USER, seed_demo
from r1platform.monitoring.multiprocess import ENV as METRICS_ENV
from r1platform.monitoring.multiprocess import wipe as wipe_metrics
from r1platform.queues import Queue
from r1platform.workers.services import live_workers

READY_TIMEOUT = 120.0
Children = dict[str, subprocess.Popen]


class Command(BaseCommand):
    help = (
        "Start the dashboard, a Celery worker, beat, MLflow's UI and the demo pool's serving "
        "process together; Ctrl-C stops them all."
    )

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000, help="dashboard port (8000)")
        parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port (5000)")
        parser.add_argument(
            "--serve-port", type=int, default=8001, help="the demo pool's serving port (8001)"
        )
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--no-demo", action="store_true", help="do not seed the demo data")
        parser.add_argument(
            "--verbose", action="store_true", help="show every service's output here"
        )

    def handle(
        self,
        port: int,
        mlflow_port: int,
        serve_port: int,
        host: str,
        no_demo: bool,
        verbose: bool,
        **options,
    ) -> None:
        logs = None if verbose else Path(settings.R1_HOME) / "logs"
        if logs is not None:
            _log_to_file(logs / "up.log")
        self.stdout.write(
            f"R1_HOME is {settings.R1_HOME}"
            + (f"; each service logs to {logs}/<service>.log" if logs else "")
        )
        call_command("migrate", interactive=False, verbosity=0)
        # Installed explicitly: a shell starting this in the background leaves SIGINT ignored,
        # and a process manager stops it with SIGTERM. Both end in the same orderly stop.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        launched = timezone.now()
        children: Children = {}
        env = self._env(host, mlflow_port)
        try:
            self._start(children, env, host, port, mlflow_port, logs)
            with self._step("waiting for the dashboard"):
                self._wait_ready(f"http://{host}:{port}/accounts/login/", children)
            if "mlflow" in children:
                with self._step("waiting for MLflow"):
                    self._wait_ready(f"http://{host}:{mlflow_port}/health", children)
            if not no_demo:
                # After the worker has reported its hardware profiles: the demo certifies on one.
                with self._step("waiting for the worker to report its hardware"):
                    self._wait_worker(children, launched)
                with self._step("seeding the demo team, user and digits model (trained here)"):
                    seed_demo()
            serving = self._start_serving(children, env, host, serve_port, logs)
            self._banner(host, port, serving, env.get("MLFLOW_UI_URL") or settings.MLFLOW_UI_URL)
            self._supervise(children)
        except KeyboardInterrupt:
            self.stdout.write("\nstopping...")
        finally:
            _stop_all(children)

    def _env(self, host: str, mlflow_port: int) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # One machine, one PID namespace: web, worker and beat share one metrics folder, wiped
        # here as prometheus-client requires (an earlier run's files would add to this one's).
        metrics_dir = Path(settings.R1_HOME) / "metrics"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        wipe_metrics(metrics_dir, recursive=True)
        env[METRICS_ENV] = str(metrics_dir)
        if settings.MLFLOW_TRACKING_URI.startswith("sqlite:"):
            # The dashboard links to the UI this command starts, on whichever port it was given.
            env.setdefault("MLFLOW_UI_URL", f"http://{host}:{mlflow_port}")
        return env

    def _start(
        self,
        children: Children,
        env: dict[str, str],
        host: str,
        port: int,
        mlflow_port: int,
        logs: Path | None,
    ) -> None:
        py = sys.executable
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
            Path(settings.MLFLOW_ARTIFACT_ROOT).mkdir(parents=True, exist_ok=True)
            commands["mlflow"] = [
                py, "-m", "mlflow", "server", "--backend-store-uri", uri,
                "--default-artifact-root", Path(settings.MLFLOW_ARTIFACT_ROOT).as_uri(),
                "--host", host, "--port", str(mlflow_port), "--workers", "1",
            ]  # fmt: skip
        for name, cmd in commands.items():
            children[name] = self._spawn(name, cmd, env, logs)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], logs: Path | None):
        output: IO[bytes] | None = None
        if logs is not None:
            logs.mkdir(parents=True, exist_ok=True)
            output = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it open
        # A session of its own, so Ctrl-C reaches only this supervisor, which then stops the
        # children in order instead of all of them dying at once mid-write.
        proc = subprocess.Popen(
            cmd,
            cwd=Path(settings.BASE_DIR),
            env=env,
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        if output is not None:
            output.close()
        self.stdout.write(f"started {name:<7} (pid {proc.pid})")
        return proc

    def _start_serving(
        self, children: Children, env: dict[str, str], host: str, port: int, logs: Path | None
    ) -> str | None:
        """The demo pool's serving process, so a promotion leads somewhere to ``curl``."""
        from r1platform.deployments.models import ServingPool

        if not ServingPool.objects.filter(name=DEMO_POOL).exists():
            return None
        cmd = [
            sys.executable, "manage.py", "serve", "--pool", DEMO_POOL,
            "--host", host, "--port", str(port),
        ]  # fmt: skip
        children["serve"] = self._spawn("serve", cmd, env, logs)
        url = f"http://{_reachable(host)}:{port}"
        with self._step(f"waiting for pool {DEMO_POOL!r} to serve"):
            self._wait_ready(f"{url}/v2/health/live", children)
        # Where the dashboard (the model page's playground) reaches this serving process.
        ServingPool.objects.filter(name=DEMO_POOL).update(url=url)
        return url

    @contextmanager
    def _step(self, label: str) -> Iterator[None]:
        """One line for a step: on a terminal it counts the seconds while the step runs."""
        start = time.monotonic()
        done = threading.Event()
        live = self.stdout.isatty()

        def tick() -> None:
            while not done.wait(1.0):
                self.stdout.write(f"\r{label}... {time.monotonic() - start:.0f} s", ending="")
                self.stdout.flush()

        ticker = threading.Thread(target=tick, daemon=True) if live else None
        if ticker is None:
            self.stdout.write(f"{label}...")
        else:
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker is not None:
                ticker.join()
            prefix = "\r" if live else ""
            self.stdout.write(f"{prefix}{label}: {time.monotonic() - start:.0f} s")

    def _wait_ready(self, url: str, children: Children) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            _check_alive(children)
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise CommandError(f"nothing answered at {url} within {READY_TIMEOUT:.0f} s")

    def _wait_worker(self, children: Children, launched: datetime) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            _check_alive(children)
            if live_workers().filter(started_at__gte=launched).exists():
                return
            time.sleep(0.5)
        raise CommandError(f"the worker did not report itself within {READY_TIMEOUT:.0f} s")

    def _banner(self, host: str, port: int, serving: str | None, mlflow_url: str) -> None:
        lines = [
            "",
            f"  r1platform dashboard   http://{host}:{port}",
            f"  demo login             {DEMO_USER} / {DEMO_PASSWORD}",
            f"  MLflow UI              {mlflow_url}",
        ]
        if serving:
            lines += [
                f"  serving (pool {DEMO_POOL})     {serving}/v2/models/<model>/infer"
                " (promote a version first)",
                f"  health                 curl {serving}/v2/health/ready",
            ]
        lines += [
            f"  API tokens             http://{host}:{port}/teams/tokens/ (or manage.py "
            "issue_token demo demo)",
            "  Ctrl-C stops everything.",
            "",
        ]
        self.stdout.write("\n".join(lines))

    def _supervise(self, children: Children) -> None:
        while True:
            _check_alive(children)
            time.sleep(1)


def _log_to_file(path: Path) -> None:
    """This process's own log lines (seeding's MLflow and Celery chatter) go to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)


def _reachable(host: str) -> str:
    """The address to call a server bound to ``host`` on: a wildcard is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_alive(children: Children) -> None:
    for name, proc in children.items():
        if proc.poll() is not None:
            raise CommandError(
                f"{name} exited with status {proc.returncode}; stopping the rest "
                f"(its log: R1_HOME/logs/{name}.log, or run with --verbose)"
            )


def _stop_all(children: Children) -> None:
    # A second Ctrl-C (or a SIGTERM after it) must not cut the stop short and leave children.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
