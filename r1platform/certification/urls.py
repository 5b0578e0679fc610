from __future__ import annotations

from django.urls import path

from r1platform.certification import views

app_name = "certification"

urlpatterns = [
    path("", views.certification_list, name="list"),
    path("<int:pk>/", views.certification_detail, name="detail"),
    path("<int:pk>/recertify/", views.recertify, name="recertify"),
    path("<int:pk>/report.html", views.report_download, {"kind": "html"}, name="report_html"),
    path("<int:pk>/report.pdf", views.report_download, {"kind": "pdf"}, name="report_pdf"),
    path("<int:pk>/report.json", views.report_download, {"kind": "json"}, name="report_json"),
    path("versions/<int:pk>/certify/", views.certify, name="certify"),
    path(
        "versions/<int:pk>/certify-everywhere/",
        views.certify_everywhere,
        name="certify_everywhere",
    ),
    path("models/<int:pk>/", views.model_matrix, name="matrix"),
]
