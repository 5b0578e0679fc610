from django.apps import AppConfig


class ServingConfig(AppConfig):
    name = "r1platform.serving"
    label = "serving"
