from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse


def platform(request: HttpRequest) -> dict[str, object]:
    # The nav's MLflow link: MLflow's own UI, or the platform's team-scoped /mlflow/ pages.
    if settings.R1_MLFLOW_LINKS == "proxy":
        return {"MLFLOW_UI_URL": reverse("mlflow:index")}
    return {"MLFLOW_UI_URL": settings.MLFLOW_UI_URL}
