from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic.base import RedirectView

from r1platform.api.api import api

urlpatterns = [
    # Browsers ask for /favicon.ico on pages without a <link rel="icon"> (reports, API docs).
    path(
        "favicon.ico",
        RedirectView.as_view(url=static("r1/favicon.svg"), permanent=True),
        name="favicon",
    ),
    path("", include("r1platform.registry.urls")),
    path("jobs/", include("r1platform.jobs.urls")),
    path("datasets/", include("r1platform.datasets.urls")),
    path("certifications/", include("r1platform.certification.urls")),
    path("deployments/", include("r1platform.deployments.urls")),
    path("serving/", include("r1platform.serving.urls")),
    path("workers/", include("r1platform.workers.urls")),
    path("schedules/", include("r1platform.schedules.urls")),
    path("notifications/", include("r1platform.notifications.urls")),
    path("teams/", include("r1platform.accounts.urls")),
    path("mlflow/", include("r1platform.core.urls")),
    path("", include("r1platform.monitoring.urls")),
    path("api/v1/", api.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
]

# Django's error pages, as JSON under /api/ (an unknown API path, an error outside a view).
handler400 = "r1platform.api.errors.bad_request"
handler403 = "r1platform.api.errors.permission_denied"
handler404 = "r1platform.api.errors.page_not_found"
handler500 = "r1platform.api.errors.server_error"
