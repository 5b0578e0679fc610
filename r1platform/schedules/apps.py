from django.apps import AppConfig


class SchedulesConfig(AppConfig):
    name = "r1platform.schedules"
    label = "schedules"
