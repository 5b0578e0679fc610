from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "r1platform.monitoring"
    label = "monitoring"
