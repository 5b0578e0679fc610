from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from r1platform.deployments import services
from r1platform.deployments.models import ServingPool, Stage
from r1platform.registry.models import ModelVersion


class Command(BaseCommand):
    help = (
        "Promote a version through the certification gate, as a scheduled job would "
        "(exit status 1 when refused)."
    )

    def add_arguments(self, parser):
        parser.add_argument("team", help="the team's slug")
        parser.add_argument("model", help="the model's name")
        parser.add_argument("version", type=int, help="the version's number")
        parser.add_argument("--pool", required=True)
        parser.add_argument("--stage", choices=Stage.values, default=Stage.STAGING)
        parser.add_argument("--reason", default="")
        parser.add_argument("--label", default="command", help="who, in the audit log")

    def handle(self, team: str, model: str, version: int, **options) -> None:
        found = (
            ModelVersion.objects.select_related("model__team")
            .filter(model__team__slug=team, model__name=model, number=version)
            .first()
        )
        if found is None:
            raise CommandError(f"{team} has no model {model!r} with a version {version}")
        pool = ServingPool.objects.filter(name=options["pool"]).first()
        if pool is None:
            raise CommandError(f"no serving pool {options['pool']!r}")
        outcome = services.promote(
            model=found.model,
            version=found,
            pool=pool,
            stage=options["stage"],
            actor=None,
            actor_label=options["label"],
            reason=options["reason"],
        )
        if outcome.refused:
            raise CommandError(f"refused: {outcome.reason}")
        self.stdout.write(f"{outcome.status}: {outcome.reason}")
