from __future__ import annotations

from django.urls import path

from r1platform.serving import views

app_name = "serving"

urlpatterns = [
    path("models/<int:pk>/playground/", views.playground, name="playground"),
]
