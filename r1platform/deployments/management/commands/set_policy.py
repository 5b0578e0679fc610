from __future__ import annotations

from argparse import BooleanOptionalAction

from django.core.management.base import BaseCommand, CommandError

from r1platform.accounts.models import Team
from r1platform.certification.models import Level
from r1platform.deployments.models import PromotionPolicy


class Command(BaseCommand):
    help = "Set what a team requires before a version serves: a certificate level, approval."

    def add_arguments(self, parser):
        parser.add_argument("team", help="the team's slug")
        parser.add_argument("--level", choices=Level.values)
        parser.add_argument(
            "--approval",
            action=BooleanOptionalAction,
            default=None,
            help="a promotion waits for another member to approve it (--no-approval: it does not)",
        )

    def handle(self, team: str, level: str | None, approval: bool | None, **options) -> None:
        found = Team.objects.filter(slug=team).first()
        if found is None:
            raise CommandError(f"no team {team!r}")
        policy, _ = PromotionPolicy.objects.get_or_create(team=found)
        if level is not None:
            policy.required_level = level
        if approval is not None:
            policy.require_approval = approval
        policy.save()
        self.stdout.write(str(policy))
