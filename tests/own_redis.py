"""A private ``redis-server`` a test may kill and start again, and this process's Celery app
pointed at it.

The machine's shared Redis is never touched: each ``OwnRedis`` listens on a free port of its own,
keeps nothing on disk, and is killed when its block ends.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import kombu.pools
import pytest

from r1platform.celery import app

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class OwnRedis:
    """One redis-server on 127.0.0.1:``port``; ``start`` and ``kill`` as often as a test likes."""

    def __init__(self) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            with suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    """A started private Redis, killed when the block ends (whatever happened in it)."""
    redis = OwnRedis()
    redis.start()
    try:
        yield redis
    finally:
        redis.kill()


def _drop_connections() -> None:
    """Forget every broker connection and producer this process holds, so the next send
    connects to the broker the configuration names now."""
    pool = app._pool
    if pool is not None:
        with suppress(Exception):
            pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    kombu.pools.reset()


@contextmanager
def celery_broker(url: str) -> Iterator[None]:
    """Point ``r1platform.celery.app`` at the broker ``url`` until the block ends.

    Celery reads ``CELERY_BROKER_URL`` from the environment before its configuration (CI's
    second run sets it), so the environment variable is switched too, the read and write URLs
    are set outright, and every cached connection and producer pool is dropped before and after.
    """
    names = ("broker_url", "broker_read_url", "broker_write_url", "broker_transport_options")
    saved: dict[str, Any] = {name: app.conf.get(name) for name in names}
    saved_env = os.environ.get("CELERY_BROKER_URL")
    _drop_connections()
    os.environ["CELERY_BROKER_URL"] = url
    app.conf.broker_url = app.conf.broker_read_url = app.conf.broker_write_url = url
    app.conf.broker_transport_options = {"socket_timeout": 3, "socket_connect_timeout": 3}
    try:
        yield
    finally:
        _drop_connections()
        if saved_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = saved_env
        for name, value in saved.items():
            app.conf[name] = value
