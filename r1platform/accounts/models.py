from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.db import models
from django.db.models import Exists, OuterRef
from django.utils import timezone

TOKEN_PREFIX = "r1_"


class Team(models.Model):
    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=60, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    members = models.ManyToManyField(
        settings.AUTH_USER_MODEL, through="Membership", related_name="teams"
    )

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    team = models.ForeignKey(Team, on_delete=models.CASCADE)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    joined_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["team", "user"], name="one_membership")]

    def __str__(self) -> str:
        return f"{self.user} in {self.team}"


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


class ApiTokenQuerySet(models.QuerySet["ApiToken"]):
    def usable(self) -> ApiTokenQuerySet:
        """The tokens that may call: not revoked, of an active user who is still a member of the
        token's team. The one definition the API and the serving processes check against."""
        member = Membership.objects.filter(team=OuterRef("team_id"), user=OuterRef("user_id"))
        return self.filter(Exists(member), revoked_at__isnull=True, user__is_active=True)


class ApiToken(models.Model):
    """A bearer token acting as ``user`` within ``team``; only its sha256 is stored.

    It works only while :meth:`ApiTokenQuerySet.usable` says so. Leaving the team or being
    deactivated also sets ``revoked_at`` (``accounts.signals``), so the admin shows why.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    team = models.ForeignKey(Team, on_delete=models.CASCADE, related_name="tokens")
    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=12)
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user} in {self.team})"

    @classmethod
    def issue(cls, user: object, team: Team, name: str = "") -> tuple[ApiToken, str]:
        """A new token and its raw value, which is shown once and never stored."""
        raw = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(
            user=user, team=team, name=name, prefix=raw[:10], token_hash=hash_token(raw)
        )
        return token, raw
