from django.apps import AppConfig


class WorkersConfig(AppConfig):
    name = "r1platform.workers"
    label = "workers"
