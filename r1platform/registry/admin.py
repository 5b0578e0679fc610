from __future__ import annotations

from django.contrib import admin

from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ["name", "team", "task", "latest_version", "updated_at", "created_by"]
    list_filter = ["task", "team"]
    list_select_related = ["team", "created_by"]
    search_fields = ["name", "mlflow_name"]
    raw_id_fields = ["team", "created_by"]
    readonly_fields = ["latest_version", "mlflow_name"]
    date_hierarchy = "updated_at"


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    # Built for 100k rows: every relation is a raw id, list rows come in one joined query, and the
    # changelist does not count the whole table.
    list_display = [
        "id",
        "model",
        "number",
        "format",
        "precision",
        "backend",
        "team",
        "size_bytes",
        "parent",
        "job",
        "created_at",
    ]
    list_filter = ["format", "precision", "backend"]
    list_select_related = ["model", "team", "parent__model", "job"]
    search_fields = ["model__name", "sha256", "original_name"]
    raw_id_fields = ["model", "team", "parent", "job", "created_by"]
    readonly_fields = ["sha256", "size_bytes", "file", "mlflow_version", "mlflow_run_id"]
    show_full_result_count = False
    list_per_page = 50


@admin.register(BenchmarkResult)
class BenchmarkResultAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "version",
        "job",
        "backend",
        "device",
        "batch_size",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "throughput",
        "created_at",
    ]
    list_filter = ["backend"]
    list_select_related = ["version__model", "job"]
    search_fields = ["version__model__name", "device"]
    raw_id_fields = ["version", "job"]
    show_full_result_count = False
