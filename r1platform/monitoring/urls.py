from __future__ import annotations

from django.urls import path

from r1platform.monitoring import views

urlpatterns = [
    path("metrics", views.metrics, name="metrics"),
]
