from __future__ import annotations

from django.urls import path

from r1platform.schedules import views

app_name = "schedules"

urlpatterns = [
    path("", views.schedule_list, name="schedule_list"),
    path("new/", views.schedule_new, name="schedule_new"),
    path("<int:pk>/", views.schedule_detail, name="schedule_detail"),
    path("<int:pk>/edit/", views.schedule_edit, name="schedule_edit"),
    path("<int:pk>/toggle/", views.schedule_toggle, name="schedule_toggle"),
    path("<int:pk>/run/", views.schedule_run, name="schedule_run"),
    path("<int:pk>/delete/", views.schedule_delete, name="schedule_delete"),
    path("templates/", views.template_list, name="template_list"),
    path("templates/new/", views.template_new, name="template_new"),
    path("templates/<int:pk>/edit/", views.template_edit, name="template_edit"),
    path("templates/<int:pk>/delete/", views.template_delete, name="template_delete"),
]
