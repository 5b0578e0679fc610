from __future__ import annotations

from django.urls import path

from r1platform.workers import views

app_name = "workers"

urlpatterns = [
    path("", views.worker_list, name="worker_list"),
]
