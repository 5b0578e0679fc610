from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from r1platform.deployments.models import ServingPool
from r1platform.workers.models import HardwareProfile


class Command(BaseCommand):
    help = "Create a serving pool for one hardware profile, or update the one of that name."

    def add_arguments(self, parser):
        parser.add_argument("name", help="a slug, e.g. cpu-a")
        parser.add_argument("--profile", required=True, help="the hardware profile's key")
        parser.add_argument("--description", default="")
        parser.add_argument("--max-batch-size", type=int, default=32)
        parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)

    def handle(self, name: str, profile: str, **options) -> None:
        found = HardwareProfile.objects.filter(key=profile).first()
        if found is None:
            known = ", ".join(HardwareProfile.objects.values_list("key", flat=True)) or "none"
            raise CommandError(f"no hardware profile {profile!r}; reported profiles: {known}")
        if options["max_batch_size"] < 1 or options["max_queue_delay_ms"] < 0:
            raise CommandError("--max-batch-size must be at least 1, --max-queue-delay-ms >= 0")
        pool, created = ServingPool.objects.update_or_create(
            name=name,
            defaults={
                "profile": found,
                "description": options["description"],
                "max_batch_size": options["max_batch_size"],
                "max_queue_delay_ms": options["max_queue_delay_ms"],
            },
        )
        self.stdout.write(f"{'created' if created else 'updated'} pool {pool.name} on {found.key}")
