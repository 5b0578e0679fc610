from django.contrib import admin

from r1platform.datasets.models import Dataset


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "version", "team", "format", "rows", "size_bytes", "created_at"]
    list_filter = ["format", "team"]
    search_fields = ["name", "sha256"]
    readonly_fields = ["sha256", "size_bytes", "rows", "schema", "file"]
    raw_id_fields = ["created_by"]
