from __future__ import annotations

app_name = "schedules"

urlpatterns: list = []
