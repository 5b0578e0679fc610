from __future__ import annotations

from django.urls import path

from r1platform.core import views

app_name = "mlflow"

# Addressed by the platform's own ids: a team's rows lead to their MLflow objects, never an id
# or name typed by the user.
urlpatterns = [
    path("", views.index, name="index"),
    path("teams/<int:pk>/", views.experiment, name="experiment"),
    path("jobs/<int:pk>/run/", views.job_run, name="job_run"),
    path("versions/<int:pk>/run/", views.version_run, name="version_run"),
    path("versions/<int:pk>/", views.model_version, name="model_version"),
    path("models/<int:pk>/", views.model, name="model"),
]
