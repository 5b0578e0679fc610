"""One place that answers "which teams may this caller see?"; every lookup goes through it."""

from __future__ import annotations

from typing import TypeVar

from django.db.models import Model, QuerySet
from django.http import Http404

from r1platform.accounts.models import Team

M = TypeVar("M", bound=Model)


def teams_for(user: object) -> QuerySet[Team]:
    if not getattr(user, "is_authenticated", False):
        return Team.objects.none()
    return Team.objects.filter(membership__user=user)


def scoped(queryset: QuerySet[M], team_ids: list[int] | QuerySet[Team], field: str = "team"):
    return queryset.filter(**{f"{field}__in": team_ids})


def get_scoped_or_404(queryset: QuerySet[M], team_ids, field: str = "team", **lookup) -> M:
    """The object if it belongs to one of ``team_ids``; 404 otherwise, as if it did not exist."""
    try:
        return scoped(queryset, team_ids, field).get(**lookup)
    except queryset.model.DoesNotExist:
        raise Http404("not found") from None
