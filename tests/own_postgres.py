"""A private PostgreSQL server for one test, on a free port, that the test may stop and start.

The machine's shared server is never touched. ``initdb`` refuses to run as root, so when the
tests run as root the data folder belongs to the ``postgres`` user (or ``nobody``) and the
server runs as that user (``runuser``). ``available()`` says why none can be started, for a skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from pathlib import Path

SEARCH = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin")


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SEARCH:
        candidate = Path(folder) / name
        if candidate.is_file():
            return str(candidate)
    return None


def _run_as() -> str | None:
    """The user the server runs as: None for ourselves, else one initdb accepts."""
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return user
    return None


def available() -> str | None:
    """None when a private server can be started here, else why not."""
    missing = [n for n in ("initdb", "pg_ctl", "postgres") if _binary(n) is None]
    if missing:
        return f"no PostgreSQL binaries ({', '.join(missing)}) on this machine"
    if os.geteuid() == 0 and (_run_as() is None or shutil.which("runuser") is None):
        return "running as root without a postgres/nobody user and runuser for initdb"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnPostgres:
    """``initdb`` in a temporary folder, then ``start``/``stop`` at will; ``remove`` at the end."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="r1-own-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.user = _run_as()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._as_owner([_binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"])

    def url(self, database: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, cmd: list[str | None], timeout: float = 60) -> None:
        argv = [str(c) for c in cmd]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_owner(
            [_binary("pg_ctl"), "-D", self.data, "-l", self.log, "-o", options, "-w", "start"]
        )

    def stop(self) -> None:
        """A fast shutdown: every client's connection is cut, as a restart does."""
        self._as_owner([_binary("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"])

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def wait_ready(self, timeout: float = 30) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def remove(self) -> None:
        with suppress(RuntimeError, subprocess.TimeoutExpired):  # not running
            self._as_owner(
                [_binary("pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"], timeout=30
            )
        shutil.rmtree(self.root, ignore_errors=True)
