"""Engine server processes kept up by the serving process: start, health, restart, stop, state.

An :class:`EngineServer` runs one replica's engine server (any command that serves HTTP on the
port it is given; ``engine_servers`` builds vLLM's and TensorRT-LLM's) from a thread of its own:

* the child runs in its own process group and session (``start_new_session``), with stdout and
  stderr appended to a log file under the serving process's work dir; on Linux it is also sent
  SIGTERM when the serving process dies (``PR_SET_PDEATHSIG``), so a killed serving process does
  not leave an engine holding a GPU;
* it is ``starting`` until its health URL answers 200 (within ``startup_timeout``), then
  ``ready``; a child that exits, or whose health check fails ``unhealthy_after`` times in a row,
  is stopped and started again after a backoff that doubles while it keeps failing;
* ``failed_starts`` starts in a row that never became healthy leave it ``failed`` for good, with
  the reason and the log's last lines (``reason``), which the model's 503 shows;
* :meth:`~EngineServer.stop` sends SIGTERM to the whole group, then SIGKILL after a grace period.

A :class:`RemoteServer` is a replica some other host runs (its base URL): only its health is
followed. Both are what ``upstream`` routes over (the :class:`Replica` protocol); the event loop
reads their state, never waits on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

log = logging.getLogger(__name__)

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
LOG_ROTATE_BYTES = 8 * 1024 * 1024
TAIL_LINES = 15
PR_SET_PDEATHSIG = 1

_LIBC: ctypes.CDLL | None = None
if sys.platform == "linux":
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before any fork


class Replica(Protocol):
    """One engine server the proxy may send requests to."""

    name: str
    headers: dict[str, str]  # sent with every request (the engine's key)

    @property
    def base_url(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def reason(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def suspect(self) -> None:
        """The proxy could not reach it: check its health now rather than at the next tick."""
        ...


def check_health(base_url: str, path: str, headers: Mapping[str, str], timeout: float) -> str:
    """ "" when ``GET base_url+path`` answers 200, else what went wrong (no proxies consulted)."""
    parts = urllib.parse.urlsplit(base_url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "", parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path.rstrip("/") + path, headers=dict(headers))
        response = connection.getresponse()
        response.read(4096)
        return "" if response.status == 200 else f"{path} answered HTTP {response.status}"
    except (OSError, http.client.HTTPException) as exc:
        return f"{path} did not answer: {exc or type(exc).__name__}"
    finally:
        connection.close()


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def log_tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class _Watched:
    """What a supervised and a followed replica share: its address and state, and the thread
    that watches it (woken early by :meth:`suspect`, ended by :meth:`_end_thread`)."""

    def __init__(self, name: str, url: str, state: str) -> None:
        self.name = name
        self._url, self._state, self._problem = url, state, ""
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return self._url

    @property
    def state(self) -> str:
        return self._state

    def suspect(self) -> None:
        self._wake.set()

    def _start_thread(self, label: str) -> None:
        self._thread = threading.Thread(target=self._run, name=label, daemon=True)
        self._thread.start()

    def _end_thread(self, timeout: float) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        raise NotImplementedError


class EngineServer(_Watched):
    """One supervised engine server process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        command: Callable[[int], Sequence[str]],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        health_path: str = "/health",
        headers: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 900.0,
        check_seconds: float = 2.0,
        unhealthy_after: int = 3,
        backoff_seconds: tuple[float, float] = (1.0, 60.0),
        failed_starts: int = 5,
        stop_grace_seconds: float = 20.0,
    ) -> None:
        super().__init__(name, "", STOPPED)
        self.command, self.log_path = command, Path(log_path)
        self.env = dict(env or {})
        self.health_path, self.headers, self.host = health_path, dict(headers or {}), host
        self.startup_timeout, self.check_seconds = startup_timeout, check_seconds
        self.unhealthy_after, self.backoff_seconds = unhealthy_after, backoff_seconds
        self.failed_starts, self.stop_grace_seconds = failed_starts, stop_grace_seconds
        self.restarts = 0  # restarts after it had been ready
        self.given_up = False  # failed for good: it is not started again
        self._since = time.monotonic()
        self._process: subprocess.Popen[bytes] | None = None

    # -- what the proxy and the runtime read -------------------------------------------------------

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def reason(self) -> str:
        """Why it is not ready ("" when it is), with the log's last lines after a failure."""
        state, problem = self._state, self._problem
        if state == READY:
            return ""
        if state == STARTING:
            waited = time.monotonic() - self._since
            text = f"{self.name} is starting ({waited:.0f} s)"
            return f"{text}; before that it {problem}" if problem else text
        if state == FAILED:
            tail = log_tail(self.log_path)
            text = f"{self.name} failed: it {problem}"
            return f"{text}\nlast log lines ({self.log_path}):\n{tail}" if tail else text
        return f"{self.name} is stopped"

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (returns at once; ``state`` says how far it got)."""
        if self._thread is not None:
            return
        self._set(STARTING, "")
        self._start_thread(f"engine {self.name}")

    def stop(self) -> None:
        """Stop the server (SIGTERM to its group, SIGKILL after the grace) and the supervision."""
        self._end_thread(self.stop_grace_seconds + 10)
        self._end_process()
        if self._state != FAILED:
            self._set(STOPPED, self._problem)

    def wait_ready(self, timeout: float) -> bool:
        """Whether it became ready within ``timeout`` (False at once once it has given up)."""
        deadline = time.monotonic() + timeout
        while self._state != READY and not self.given_up and not self._stopping.is_set():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return self._state == READY

    # -- the supervising thread --------------------------------------------------------------------

    def _run(self) -> None:
        failed_starts, failures = 0, 0
        try:
            while not self._stopping.is_set():
                try:
                    self._launch()
                except OSError as exc:  # not installed, not executable: trying again will not help
                    self.given_up = True
                    self._set(FAILED, f"could not be started: {exc}")
                    return
                problem = self._wait_healthy()
                if problem is None:
                    return
                if not problem:
                    failed_starts = failures = 0
                    self._set(READY, "")
                    log.info("engine server %s ready at %s", self.name, self._url)
                    problem = self._watch()
                    if problem is None:
                        return
                    self.restarts += 1
                else:
                    failed_starts += 1
                failures += 1
                log.warning("engine server %s %s", self.name, problem)
                self._end_process()
                if failed_starts >= self.failed_starts:
                    self.given_up = True
                    self._set(FAILED, f"{problem} ({failed_starts} starts in a row; given up)")
                    return
                first, most = self.backoff_seconds
                self._set(FAILED if failed_starts else STARTING, problem)
                if self._stopping.wait(min(first * 2 ** (failures - 1), most)):
                    return
                self._set(STARTING, problem)
        finally:
            self._end_process()

    def _launch(self) -> None:
        port = free_port(self.host)
        argv = list(self.command(port))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_suffix(self.log_path.suffix + ".1"))
        with self.log_path.open("ab") as output:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            output.write(f"=== {stamp} {self.name}: {shlex.join(argv)}\n".encode())
            output.flush()
            self._process = self._spawn(argv, output)
        self._url = f"http://{self.host}:{port}"
        self._since = time.monotonic()

    def _spawn(self, argv: list[str], output: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 (argv is built by the platform, never a shell)
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            start_new_session=True,  # its own process group: stopped as a whole
            preexec_fn=_die_with_parent if _LIBC is not None else None,  # noqa: PLW1509
        )

    def _wait_healthy(self) -> str | None:
        """ "" once healthy, the problem when it will not be, None when stopping."""
        deadline = time.monotonic() + self.startup_timeout
        while not self._stopping.is_set():
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                return f"{describe_exit(code)} before answering {self.health_path}"
            if not self._check():
                return ""
            if time.monotonic() > deadline:
                return f"did not answer {self.health_path} within {self.startup_timeout:g} s"
            self._stopping.wait(0.25)
        return None

    def _watch(self) -> str | None:
        """Until the server dies or stays unhealthy (the problem), or stopping (None)."""
        misses, last = 0, ""
        while True:
            self._wake.wait(self.check_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                return None
            assert self._process is not None
            code = self._process.poll()
            if code is not None:
                return describe_exit(code)
            problem = self._check()
            misses, last = (misses + 1, problem) if problem else (0, "")
            if misses >= self.unhealthy_after:
                return f"failed its health check {misses} times in a row ({last})"

    def _check(self) -> str:
        return check_health(self._url, self.health_path, self.headers, timeout=5.0)

    def _end_process(self) -> None:
        """SIGTERM to the whole group, SIGKILL after the grace period (children included)."""
        process, self._process = self._process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(self.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            log.warning("engine server %s ignored SIGTERM; killing it", self.name)
        # The leader may be gone while others of its group (an engine's workers) live on.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def _set(self, state: str, problem: str) -> None:
        if state != self._state:
            self._since = time.monotonic()
        self._state, self._problem = state, problem


class RemoteServer(_Watched):
    """A replica run elsewhere (another host's engine server): its health is followed."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        health_path: str = "/health",
        headers: Mapping[str, str] | None = None,
        check_seconds: float = 2.0,
    ) -> None:
        super().__init__(name, url.rstrip("/"), STARTING)
        self.health_path, self.headers = health_path, dict(headers or {})
        self.check_seconds = check_seconds

    @property
    def reason(self) -> str:
        if self._state == READY:
            return ""
        if self._state == FAILED:
            return f"{self.name} ({self._url}) is unreachable: {self._problem}"
        return f"{self.name} ({self._url}) has not answered yet"

    def start(self) -> None:
        if self._thread is None:
            self._start_thread(f"remote {self.name}")

    def stop(self) -> None:
        self._end_thread(10)
        self._state = STOPPED

    def _run(self) -> None:
        while not self._stopping.is_set():
            problem = check_health(self._url, self.health_path, self.headers, timeout=5.0)
            self._state, self._problem = (FAILED, problem) if problem else (READY, "")
            self._wake.wait(self.check_seconds)
            self._wake.clear()
