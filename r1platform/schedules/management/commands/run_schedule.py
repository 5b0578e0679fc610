"""``manage.py run_schedule ID``: run a schedule now, as the dashboard's "run now" does."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from r1platform.schedules.runs import run_schedule


class Command(BaseCommand):
    help = "Run a schedule now (even if paused or its data is unchanged) and print what it did."

    def add_arguments(self, parser) -> None:
        parser.add_argument("schedule_id", type=int)

    def handle(self, *args, schedule_id: int, **options) -> None:
        run = run_schedule(schedule_id, trigger="manual")
        if run is None:
            raise CommandError(f"schedule {schedule_id} does not exist")
        line = f"run {run.pk}: {run.decision}"
        self.stdout.write(f"{line} ({run.reason})" if run.reason else line)
