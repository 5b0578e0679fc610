from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils.text import slugify

from r1platform.accounts.models import ApiToken, Membership, Team


class Command(BaseCommand):
    help = "Print a new API token for a user in a team (shown once; only its hash is stored)."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("team", help="the team's slug")
        parser.add_argument(
            "--create", action="store_true", help="create the user, team and membership if missing"
        )
        parser.add_argument("--name", default="", help="a label for the token")

    @transaction.atomic
    def handle(self, username: str, team: str, create: bool, name: str, **options) -> None:
        User = get_user_model()
        user = User.objects.filter(username=username).first()
        found_team = Team.objects.filter(slug=team).first()
        if create:
            if user is None:
                user = User.objects.create_user(username=username)
            if found_team is None:
                found_team = Team.objects.create(name=team, slug=slugify(team) or team)
            Membership.objects.get_or_create(team=found_team, user=user)
        if user is None:
            raise CommandError(f"no user {username!r} (add --create to make one)")
        if found_team is None:
            raise CommandError(f"no team {team!r} (add --create to make one)")
        if not Membership.objects.filter(team=found_team, user=user).exists():
            raise CommandError(f"{username} is not a member of {team} (add --create to add them)")
        _, raw = ApiToken.issue(user, found_team, name=name)
        self.stdout.write(raw)
