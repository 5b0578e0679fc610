"""Tokens are revoked when their user leaves the team or is deactivated.

``ApiToken.objects.usable()`` already refuses such tokens (also after a bulk ``update`` that sends
no signal); these receivers record it on the tokens, so the admin shows them revoked, and a user
who rejoins or is reactivated needs new tokens.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from r1platform.accounts.models import Membership
from r1platform.accounts.services import revoke_tokens


@receiver(post_delete, sender=Membership, dispatch_uid="accounts.revoke_on_leave")
def revoke_on_leave(sender: type[Membership], instance: Membership, **kwargs: object) -> None:
    revoke_tokens(instance.user_id, instance.team_id)


@receiver(post_save, sender=settings.AUTH_USER_MODEL, dispatch_uid="accounts.revoke_on_deactivate")
def revoke_on_deactivate(sender: type, instance: object, **kwargs: object) -> None:
    if not getattr(instance, "is_active", True):
        revoke_tokens(instance.pk)  # type: ignore[attr-defined]
