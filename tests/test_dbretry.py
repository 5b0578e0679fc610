"""``gpu_workers.dbretry``: must-land writes wait out a short outage, others are skipped.

``transactional_db``: as on a worker, no transaction is open around the write (``db`` wraps the
test in one, where nothing may be retried).
"""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction
from django.db.utils import InterfaceError, OperationalError

from gpu_workers import dbretry
from r1platform.accounts.models import Team


class Flaky:
    """Fails ``failures`` times with ``error``, then does a real query (a team count)."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return Team.objects.count()


@pytest.fixture
def resets(monkeypatch) -> list[int]:
    """Each connection drop ``dbretry`` makes, counted."""
    seen: list[int] = []
    real = dbretry.reset_connection
    monkeypatch.setattr(dbretry, "reset_connection", lambda: (seen.append(1), real()))
    return seen


def test_a_write_is_retried_on_a_new_connection_until_the_database_answers(
    transactional_db, resets
):
    pauses: list[float] = []
    write = Flaky(3, OperationalError("connection refused"))

    assert dbretry.retry_db(write, "testing", seconds=60, sleep=pauses.append) == 0

    assert write.calls == 4 and len(resets) == 3
    assert pauses == [0.5, 1.0, 2.0]  # doubling, from FIRST_PAUSE


def test_a_closed_connection_is_retried_too(transactional_db):
    write = Flaky(1, InterfaceError("connection already closed"))
    assert dbretry.retry_db(write, "testing", seconds=60, sleep=lambda s: None) == 0
    assert write.calls == 2


def test_it_gives_up_once_its_time_is_spent_and_raises_the_error(transactional_db):
    write = Flaky(100, OperationalError("connection refused"))
    with pytest.raises(OperationalError, match="refused"):
        dbretry.retry_db(write, "testing", seconds=1.2)
    assert write.calls == 2  # 0.5 s pause, then a 1 s pause would pass the 1.2 s budget


def test_the_budget_defaults_to_the_setting(transactional_db, settings):
    settings.R1_DB_RETRY_SECONDS = 0
    write = Flaky(1, OperationalError("connection refused"))
    with pytest.raises(OperationalError):
        dbretry.retry_db(write, "testing")
    assert write.calls == 1


def test_other_database_errors_are_not_retried(transactional_db):
    write = Flaky(1, IntegrityError("duplicate key"))
    with pytest.raises(IntegrityError):
        dbretry.retry_db(write, "testing", seconds=60, sleep=lambda s: None)
    assert write.calls == 1


def test_nothing_is_retried_inside_a_transaction(transactional_db):
    write = Flaky(1, OperationalError("connection refused"))
    with pytest.raises(OperationalError), transaction.atomic():
        dbretry.retry_db(write, "testing", seconds=60, sleep=lambda s: None)
    assert write.calls == 1


def test_best_effort_skips_a_write_the_database_cannot_take(transactional_db, resets):
    assert dbretry.best_effort(Flaky(1, OperationalError("down")), "testing", -1) == -1
    assert len(resets) == 1
    assert dbretry.best_effort(Flaky(0, OperationalError("down")), "testing", -1) == 0
