"""API tokens: issued to a member of a team, revoked by their owner, or when access ends."""

from __future__ import annotations

from django.utils import timezone

from r1platform.accounts.models import ApiToken, Membership, Team


def revoke_tokens(user_id: int, team_id: int | None = None) -> int:
    """Mark the user's tokens (in ``team_id``, or in every team) revoked; how many were."""
    tokens = ApiToken.objects.filter(user_id=user_id, revoked_at__isnull=True)
    if team_id is not None:
        tokens = tokens.filter(team_id=team_id)
    return tokens.update(revoked_at=timezone.now())


def issue_token(user: object, team_id: int, name: str) -> tuple[ApiToken, str]:
    """A new token for ``user`` in one of their teams, and its raw value (shown once)."""
    if not Membership.objects.filter(user=user, team_id=team_id).exists():
        raise PermissionError("you can make tokens only for a team you belong to")
    return ApiToken.issue(user, Team.objects.get(pk=team_id), name=name.strip()[:100])


def revoke_own_token(user: object, token_id: int) -> bool:
    """Revoke one of ``user``'s own tokens; False if it was revoked already (or is not theirs)."""
    tokens = ApiToken.objects.filter(pk=token_id, user=user, revoked_at__isnull=True)
    return tokens.update(revoked_at=timezone.now()) == 1
