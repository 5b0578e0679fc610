"""Database writes that outlast a short database outage (a PostgreSQL restart, a fail-over).

A worker's job may run for hours; the database it reports to may restart meanwhile. A write that
must land (a job's end, a stage's result) is retried with ``retry_db`` until the database answers
again or ``R1_DB_RETRY_SECONDS`` have passed; one that may be skipped (a progress line, a
heartbeat the next beat repeats) goes through ``best_effort``. Between attempts the broken
connection is closed, so the next attempt opens a new one: Django never reconnects by itself a
connection whose server went away.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import connection
from django.db.utils import InterfaceError, OperationalError

log = logging.getLogger(__name__)

T = TypeVar("T")

# What a lost or refused connection raises; an IntegrityError or a bad query is not retried.
CONNECTION_ERRORS = (OperationalError, InterfaceError)
FIRST_PAUSE = 0.5
LONGEST_PAUSE = 5.0


def reset_connection() -> None:
    """Drop this thread's connection, so the next query opens a fresh one."""
    try:
        connection.close()
    except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail; it is dropped
        log.debug("closing a broken database connection: %s", exc)


def retry_db(
    write: Callable[[], T],
    what: str,
    seconds: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``write()``, tried again across a lost connection for up to ``seconds``; its result.

    ``seconds`` defaults to ``R1_DB_RETRY_SECONDS``. The last error is raised once that time is
    spent. Inside a transaction nothing is retried: the transaction is lost with its connection,
    and only its owner can start it again.
    """
    budget = float(settings.R1_DB_RETRY_SECONDS if seconds is None else seconds)
    deadline = time.monotonic() + budget
    pause = FIRST_PAUSE
    attempt = 1
    while True:
        try:
            return write()
        except CONNECTION_ERRORS as exc:
            if connection.in_atomic_block or time.monotonic() + pause > deadline:
                raise
            log.warning(
                "database unreachable while %s (attempt %d: %s); retrying in %.1f s",
                what,
                attempt,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                pause,
            )
        reset_connection()
        sleep(pause)
        pause = min(pause * 2, LONGEST_PAUSE)
        attempt += 1


def best_effort(write: Callable[[], T], what: str, default: T) -> T:
    """``write()``, or ``default`` when the database cannot be reached (logged, not raised)."""
    try:
        return write()
    except CONNECTION_ERRORS as exc:
        if connection.in_atomic_block:
            raise
        log.warning("database unreachable while %s; skipped: %s", what, exc)
        reset_connection()
        return default
