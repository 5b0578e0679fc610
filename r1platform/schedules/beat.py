"""The beat scheduler: django-celery-beat's database scheduler that sends only while it leads.

Exactly one beat process may send scheduled tasks. Each beat holds, or waits for, one lease row
(``BeatLease``) in the database: a conditional UPDATE takes it when it has expired or is already
ours, and renews it on every tick, so the UPDATE's WHERE clause is the lock and no two beats can
both believe they lead for longer than a clock skew. A second beat started by mistake stays
standby (and says so in its log) until the first stops renewing, then takes over within
``R1_BEAT_LEASE_SECONDS``. ``schedules.runs.run_schedule`` ignores a duplicate tick anyway, so
correctness does not rest on the lease alone.

Set as ``CELERY_BEAT_SCHEDULER``; the static ``CELERY_BEAT_SCHEDULE`` entries (the reaper) are
stored as PeriodicTask rows by the parent class and sent by the leader like every schedule.

A database outage (a PostgreSQL restart) never stops beat: a tick that cannot reach the database
logs it, drops the connection and sends nothing; the next tick, on a new connection, tries again.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import uuid
from typing import Any

from django.conf import settings
from django.db import Error, IntegrityError, close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone
from django_celery_beat.schedulers import SCHEDULE_SYNC_MAX_INTERVAL, DatabaseScheduler

from r1platform.schedules.models import BeatLease

log = logging.getLogger(__name__)

LEASE_NAME = "beat"


def holder_id() -> str:
    """This process, unmistakably: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def take_lease(holder: str, seconds: float, name: str = LEASE_NAME) -> bool:
    """Take or renew the lease for ``holder``; whether it holds it now.

    One conditional UPDATE: it matches only when the lease is free (expired) or already ours.
    The row is created by the first beat ever; two first beats racing to insert get one winner.
    """
    now = timezone.now()
    until = now + datetime.timedelta(seconds=seconds)
    free = Q(expires_at__lt=now) | Q(holder=holder)
    taken = BeatLease.objects.filter(free, name=name).update(holder=holder, expires_at=until)
    if taken:
        return True
    if BeatLease.objects.filter(name=name).exists():
        return False
    try:
        with transaction.atomic():
            BeatLease.objects.create(name=name, holder=holder, expires_at=until, acquired_at=now)
    except IntegrityError:
        return False
    return True


def release_lease(holder: str, name: str = LEASE_NAME) -> None:
    """Let the lease go at once (a clean stop), so a standby beat need not wait for it to expire."""
    BeatLease.objects.filter(name=name, holder=holder).update(expires_at=timezone.now())


class LeaderScheduler(DatabaseScheduler):
    """DatabaseScheduler that sends due tasks only while holding the beat lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.holder = holder_id()
        self.lease_seconds = float(settings.R1_BEAT_LEASE_SECONDS)
        self.leading: bool | None = None  # None: not asked yet
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        # Renew often enough that a leader between two ticks never lets its lease lapse.
        renew_every = max(0.5, self.lease_seconds / 3)
        try:
            if not self._lead():
                return renew_every
            return min(super().tick(*args, **kwargs), renew_every)
        except Error as exc:  # the parent reads and writes its entries outside any try
            log.warning(
                "beat %s: the database failed during a tick (%s); trying again in %.1f s",
                self.holder,
                exc,
                renew_every,
            )
            self._drop_connection()
            self._reload()  # the entries may be half-read: read them whole next time
            return renew_every

    def _drop_connection(self) -> None:
        try:
            connection.close()
        except Error as exc:
            log.debug("beat %s: closing a broken connection: %s", self.holder, exc)

    def _lead(self) -> bool:
        try:
            close_old_connections()
            leading = take_lease(self.holder, self.lease_seconds)
        except Error as exc:
            # Without the database no one can tell who leads: send nothing until it is back,
            # then read every entry afresh, as a standby taking over does.
            log.warning("beat %s: cannot reach the lease (%s); sending nothing", self.holder, exc)
            self._drop_connection()
            self.leading = False
            return False
        if leading and self.leading is False:
            # Standby until now: the entries' last runs were written by the previous leader.
            self._reload()
        if leading != self.leading:
            self._say(leading)
        self.leading = leading
        return leading

    def _say(self, leading: bool) -> None:
        if leading:
            log.info("beat %s: leader, sending scheduled tasks", self.holder)
            return
        lease = BeatLease.objects.filter(name=LEASE_NAME).first()
        who = f"{lease.holder} until {lease.expires_at:%H:%M:%S}" if lease else "another beat"
        log.warning(
            "beat %s: standby, another beat holds the lease (%s); sending nothing until it "
            "stops. If this beat was started by mistake, stop it.",
            self.holder,
            who,
        )

    def _reload(self) -> None:
        self._dirty.clear()
        # The parent's next read of ``schedule`` reloads every entry and rebuilds the heap.
        self._last_full_sync = datetime.datetime.now() - datetime.timedelta(
            seconds=SCHEDULE_SYNC_MAX_INTERVAL + 1
        )

    def sync(self) -> None:
        # A standby has sent nothing, so it has nothing of its own to write.
        if self.leading:
            super().sync()
        else:
            self._dirty.clear()

    def close(self) -> None:
        super().close()
        if self.leading:
            try:
                release_lease(self.holder)
                log.info("beat %s: stopped, lease released", self.holder)
            except Error as exc:
                log.warning("beat %s: could not release the lease: %s", self.holder, exc)
