"""Bearer-token auth for the API: a token acts as one user within one team, and only while
``ApiToken.objects.usable()`` says so (not revoked, its user active and still a member)."""

from __future__ import annotations

from django.http import HttpRequest
from django.utils import timezone
from ninja.security import HttpBearer

from r1platform.accounts.models import ApiToken, hash_token


class TeamToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> ApiToken | None:
        found = (
            ApiToken.objects.usable()
            .select_related("team", "user")
            .filter(token_hash=hash_token(token))
            .first()
        )
        if found is None:
            return None
        ApiToken.objects.filter(pk=found.pk).update(last_used_at=timezone.now())
        request.user = found.user
        return found


def team_id(request: HttpRequest) -> int:
    return request.auth.team_id  # type: ignore[attr-defined]
