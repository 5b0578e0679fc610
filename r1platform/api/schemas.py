"""Schemas more than one router uses: the error body, a stage as posted, a version reference."""

from __future__ import annotations

from typing import Any

from ninja import Schema


class ErrorOut(Schema):
    detail: str


# The refusals most writes can answer with; a router adds the others it needs (403, ...).
Errors = {400: ErrorOut, 404: ErrorOut, 409: ErrorOut, 413: ErrorOut}


class StageIn(Schema):
    name: str
    settings: dict[str, Any] = {}


class VersionRefOut(Schema):
    id: int
    number: int
    format: str
    precision: str
    backend: str


def username(user: Any) -> str | None:
    """How a user is named in answers: their username, or None for no user (a deleted one)."""
    return user.get_username() if user else None


def page_limit(limit: int) -> int:
    """A list's ``limit`` clamped to 1..500, so a page is never empty by mistake nor unbounded."""
    return max(1, min(limit, 500))
