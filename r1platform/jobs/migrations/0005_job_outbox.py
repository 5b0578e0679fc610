"""The job outbox: ``sent_at`` and ``send_attempts``. Jobs that exist already were sent when they
were created (they went out by ``on_commit``), so they are marked sent then."""

from django.db import migrations, models
from django.db.models import F


def mark_existing_sent(apps, schema_editor) -> None:
    Job = apps.get_model("jobs", "Job")
    Job.objects.filter(sent_at__isnull=True).update(sent_at=F("created_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0004_job_status_stage_queue"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="sent_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="job",
            name="send_attempts",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(mark_existing_sent, migrations.RunPython.noop),
    ]
