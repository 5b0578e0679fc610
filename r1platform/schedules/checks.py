"""The field checks every write of a template or a schedule goes through, and their refusal.

A refusal is a ``ScheduleRefused`` whose message says what is wrong and how to fix it; the
dashboard shows it on the form and the API answers it as a 400. Nothing is saved when one is
raised.
"""

from __future__ import annotations

import math
from typing import Any

from celery.schedules import crontab
from django.core.exceptions import ValidationError
from django_celery_beat import validators

from r1platform.datasets.models import Dataset

MIN_INTERVAL_SECONDS = 10
CRON_FIELDS = (
    ("minute", validators.minute_validator),
    ("hour", validators.hour_validator),
    ("day_of_month", validators.day_of_month_validator),
    ("month_of_year", validators.month_of_year_validator),
    ("day_of_week", validators.day_of_week_validator),
)


class ScheduleRefused(Exception):
    """Bad input for a template or a schedule; the message says what and why. Nothing saved."""


def check_timing(cron: str, interval_seconds: int | None) -> tuple[str, int | None]:
    """(cron, interval) normalized: exactly one set, the cron five valid fields (UTC), the
    interval a whole number of seconds, at least MIN_INTERVAL_SECONDS."""
    cron = " ".join(str(cron or "").split())
    if cron and interval_seconds is not None:
        raise ScheduleRefused("give either cron or interval_seconds, not both")
    if not cron and interval_seconds is None:
        raise ScheduleRefused(
            'give cron (five fields, UTC, e.g. "0 3 * * *") or interval_seconds (e.g. 86400)'
        )
    if not cron:
        if isinstance(interval_seconds, bool) or not isinstance(interval_seconds, int):
            raise ScheduleRefused(
                f"interval_seconds must be a whole number, got {interval_seconds!r}"
            )
        if interval_seconds < MIN_INTERVAL_SECONDS:
            raise ScheduleRefused(
                f"interval_seconds must be at least {MIN_INTERVAL_SECONDS}, got {interval_seconds}"
            )
        return "", interval_seconds
    fields = cron.split(" ")
    if len(fields) != len(CRON_FIELDS):
        raise ScheduleRefused(
            f"cron {cron!r} has {len(fields)} field(s); it needs five: minute hour day-of-month "
            'month day-of-week (UTC), e.g. "0 3 * * *"'
        )
    for index, ((field, validate), value) in enumerate(zip(CRON_FIELDS, fields, strict=True), 1):
        try:
            validate(value)
            crontab(**{field: value})
        except (ValidationError, ValueError) as exc:
            why = "; ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            why = why.strip('"')
            raise ScheduleRefused(
                f"cron field {index} ({field}) {value!r} does not parse: {why}"
            ) from None
    return cron, None


def check_margin(value: Any) -> float:
    """The champion/challenger margin as a finite float, at least 0."""
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise ScheduleRefused(f"margin must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(margin) or margin < 0:
        raise ScheduleRefused(f"margin must be a finite number at least 0, got {value!r}")
    return margin


def check_split(split: str, dataset: Dataset) -> None:
    """``split`` names a non-empty split of ``dataset``, or ``all``."""
    splits = [n for n in ("train", "validation", "test") if float(dataset.splits.get(n, 0)) > 0]
    splits.append("all")
    if split not in splits:
        raise ScheduleRefused(
            f"eval_split {split!r} is not a split of {dataset}; its splits: {', '.join(splits)}"
        )


def clean_name(value: Any, what: str) -> str:
    """The name of a ``what`` (template, schedule) with its whitespace collapsed; not empty."""
    name = " ".join(str(value or "").split())
    if not name:
        raise ScheduleRefused(f"the {what} needs a name")
    if len(name) > 100:
        raise ScheduleRefused(f"the {what}'s name is longer than 100 characters")
    return name


def creator(user: object) -> Any:
    """The user to record as creator: None for an anonymous caller (a command, the demo)."""
    return user if getattr(user, "is_authenticated", False) else None
