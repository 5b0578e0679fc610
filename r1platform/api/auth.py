"""Bearer-token auth for the API: a token acts as one user within one team."""

from __future__ import annotations

from django.http import HttpRequest
from django.utils import timezone
from ninja.security import HttpBearer

from r1platform.accounts.models import ApiToken, hash_token


class TeamToken(HttpBearer):
    def authenticate(self, request: HttpRequest, token: str) -> ApiToken | None:
        found = (
            ApiToken.objects.select_related("team", "user")
            .filter(token_hash=hash_token(token), user__is_active=True)
            .first()
        )
        if found is None:
            return None
        ApiToken.objects.filter(pk=found.pk).update(last_used_at=timezone.now())
        request.user = found.user
        return found


def team_id(request: HttpRequest) -> int:
    return request.auth.team_id  # type: ignore[attr-defined]
