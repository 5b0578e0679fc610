from __future__ import annotations

from argparse import BooleanOptionalAction

from django.core.management.base import BaseCommand, CommandError

from r1platform.accounts.models import Team
from r1platform.certification.models import CriteriaPolicy, Level
from r1platform.deployments.models import PromotionPolicy


class Command(BaseCommand):
    help = (
        "Set what a team requires before a version serves: a certificate level, approval, and "
        "the certification criteria (API success rate, QPS per card) where they differ."
    )

    def add_arguments(self, parser):
        parser.add_argument("team", help="the team's slug")
        parser.add_argument("--level", choices=Level.values)
        parser.add_argument(
            "--approval",
            action=BooleanOptionalAction,
            default=None,
            help="a promotion waits for another member to approve it (--no-approval: it does not)",
        )
        parser.add_argument(
            "--min-success-rate",
            type=float,
            help="API success rate every certificate of the team needs (0.999 to 1; -1 clears)",
        )
        parser.add_argument(
            "--min-qps-per-card",
            type=float,
            help="QPS per card a performance certificate needs (default 500; -1 clears)",
        )

    def handle(self, team: str, level: str | None, approval: bool | None, **options) -> None:
        rate, qps = options.get("min_success_rate"), options.get("min_qps_per_card")
        if rate is not None and rate != -1 and not 0.999 <= rate <= 1.0:
            raise CommandError(
                "--min-success-rate must be between 0.999 and 1 (the source's floor)"
            )
        if qps is not None and qps != -1 and qps < 0:
            raise CommandError("--min-qps-per-card must be 0 or more")
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
        if rate is None and qps is None:
            return
        criteria, _ = CriteriaPolicy.objects.get_or_create(team=found)
        if rate is not None:
            criteria.min_success_rate = None if rate == -1 else rate
        if qps is not None:
            criteria.min_qps_per_card = None if qps == -1 else qps
        criteria.save()
        self.stdout.write(str(criteria))
