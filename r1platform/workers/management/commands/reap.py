from __future__ import annotations

from django.core.management.base import BaseCommand

from r1platform.jobs.services import reap_lost_workers


class Command(BaseCommand):
    help = "Re-queue (or fail, past R1_MAX_JOB_ATTEMPTS) the stale running jobs of lost workers."

    def handle(self, **options) -> None:
        reaped = reap_lost_workers()
        for r in reaped:
            self.stdout.write(f"job {r.job_id}: {r.outcome} (worker {r.hostname} lost)")
        self.stdout.write(f"{len(reaped)} job{'s' if len(reaped) != 1 else ''} recovered")
