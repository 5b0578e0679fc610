from __future__ import annotations

from django.urls import path

from r1platform.registry import downloads, views

app_name = "registry"

urlpatterns = [
    path("", views.model_list, name="model_list"),
    path("models/upload/", views.model_upload, name="model_upload"),
    path("models/<int:pk>/", views.model_detail, name="model_detail"),
    path("models/<int:pk>/compare/", views.compare, name="compare"),
    path("versions/<int:pk>/", views.version_detail, name="version_detail"),
    path("versions/<int:pk>/download/", downloads.version_download, name="version_download"),
    path("versions/<int:pk>/mirror/", views.version_mirror, name="version_mirror"),
]
