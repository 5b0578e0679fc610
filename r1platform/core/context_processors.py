from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest


def platform(request: HttpRequest) -> dict[str, object]:
    return {"MLFLOW_UI_URL": settings.MLFLOW_UI_URL}
