"""Settings are edited here like in the dashboard; deliveries are a read-only log."""

from __future__ import annotations

from django.contrib import admin

from r1platform.notifications.models import Delivery, NotificationSettings


@admin.register(NotificationSettings)
class NotificationSettingsAdmin(admin.ModelAdmin):
    list_display = ["team", "webhook_url", "updated_at"]
    list_select_related = ["team"]
    search_fields = ["team__slug", "webhook_url"]
    raw_id_fields = ["team"]


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = ["created_at", "team", "event", "channel", "target", "status", "attempts"]
    list_display += ["response_status", "duration_ms"]
    list_filter = ["status", "channel", "event"]
    list_select_related = ["team"]
    search_fields = ["team__slug", "target"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
