"""Revoking API tokens: one user's tokens, for one team or for all of them."""

from __future__ import annotations

from django.utils import timezone

from r1platform.accounts.models import ApiToken


def revoke_tokens(user_id: int, team_id: int | None = None) -> int:
    """Mark the user's tokens (in ``team_id``, or in every team) revoked; how many were."""
    tokens = ApiToken.objects.filter(user_id=user_id, revoked_at__isnull=True)
    if team_id is not None:
        tokens = tokens.filter(team_id=team_id)
    return tokens.update(revoked_at=timezone.now())
