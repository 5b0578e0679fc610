from __future__ import annotations

from django.contrib import admin

from r1platform.jobs.models import Job


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "team",
        "version",
        "status",
        "progress",
        "current_stage",
        "queue",
        "attempts",
        "worker_host",
        "created_at",
        "finished_at",
    ]
    list_filter = ["status", "queue", "team"]
    list_select_related = ["team", "version__model"]
    search_fields = ["idempotency_key", "worker_host", "version__model__name", "mlflow_run_id"]
    raw_id_fields = ["team", "version", "created_by"]
    readonly_fields = [
        "progress",
        "current_stage",
        "stage_results",
        "log_tail",
        "attempts",
        "worker_host",
        "mlflow_run_id",
        "mlflow_experiment_id",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "idempotency_key",
    ]
    date_hierarchy = "created_at"
    show_full_result_count = False
