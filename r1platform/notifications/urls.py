from __future__ import annotations

from django.urls import path

from r1platform.notifications import views

app_name = "notifications"

# <pk> is a team's: each team has its own settings, saved and tested separately.
urlpatterns = [
    path("", views.index, name="index"),
    path("<int:pk>/", views.save_settings, name="save"),
    path("<int:pk>/test", views.send_test, name="send_test"),
]
