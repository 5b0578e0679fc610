from __future__ import annotations

from django.urls import path

from r1platform.deployments import views

app_name = "deployments"

urlpatterns = [
    path("models/<int:pk>/", views.model_deployments, name="model"),
    path("models/<int:pk>/promote/", views.promote, name="promote"),
    path("models/<int:pk>/rollback/", views.rollback, name="rollback"),
    path("models/<int:pk>/audit/", views.audit_log, name="audit"),
    path("requests/<int:pk>/approve/", views.approve, name="approve"),
    path("requests/<int:pk>/reject/", views.reject, name="reject"),
]
