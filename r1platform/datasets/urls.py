from __future__ import annotations

from django.urls import path

from r1platform.datasets import views

app_name = "datasets"

urlpatterns = [
    path("", views.dataset_list, name="dataset_list"),
    path("upload/", views.dataset_upload, name="dataset_upload"),
    path("<int:pk>/", views.dataset_detail, name="dataset_detail"),
]
