from __future__ import annotations

from django.core.management.base import BaseCommand

from r1platform.core.demo import DEMO_PASSWORD, DEMO_USER, seed_demo


class Command(BaseCommand):
    help = (
        "Create the demo team, user and a small digits classifier (trained here, not downloaded)."
    )

    def handle(self, **options) -> None:
        version = seed_demo()
        self.stdout.write(f"demo model: {version} ({version.label})")
        self.stdout.write(f"demo login: {DEMO_USER} / {DEMO_PASSWORD}")
