from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from r1platform.deployments.models import ServingPool, Stage
from r1platform.serving.deployments_source import pool_deployments
from r1platform.serving.triton import export_repository


class Command(BaseCommand):
    help = "Write a pool's deployments as a Triton Inference Server model repository."

    def add_arguments(self, parser):
        parser.add_argument("--pool", required=True, help="the serving pool's name")
        parser.add_argument("--out", required=True, type=Path, help="the repository folder")
        parser.add_argument("--stage", choices=Stage.values, default=Stage.PRODUCTION)

    def handle(self, *args, pool: str, out: Path, stage: str, **options) -> None:
        if not ServingPool.objects.filter(name=pool).exists():
            raise CommandError(f"no serving pool {pool!r}")
        result = export_repository(pool_deployments(pool, stage), out)
        for folder in result.written:
            self.stdout.write(f"wrote {folder}")
        if result.skipped:
            reasons = "; ".join(f"{name}: {why}" for name, why in result.skipped.items())
            raise CommandError(f"not exported: {reasons}")
        if not result.written:
            self.stdout.write(f"pool {pool} has no {stage} deployments")
