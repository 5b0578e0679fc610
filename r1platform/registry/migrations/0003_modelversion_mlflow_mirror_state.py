from django.db import migrations, models


def mark_mirrored(apps, schema_editor):
    ModelVersion = apps.get_model("registry", "ModelVersion")
    ModelVersion.objects.exclude(mlflow_version="").update(mlflow_state="mirrored")


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0002_benchmarkresult_converged_benchmarkresult_gpu_mem_mb_and_more"),
    ]

    operations = [
        migrations.AddField(
            model_name="modelversion",
            name="mlflow_state",
            field=models.CharField(
                choices=[("pending", "Pending"), ("mirrored", "Mirrored"), ("failed", "Failed")],
                db_index=True,
                default="pending",
                max_length=10,
            ),
        ),
        migrations.AddField(
            model_name="modelversion",
            name="mlflow_error",
            field=models.TextField(blank=True),
        ),
        migrations.AddField(
            model_name="modelversion",
            name="mlflow_attempts",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.RunPython(mark_mirrored, migrations.RunPython.noop),
    ]
