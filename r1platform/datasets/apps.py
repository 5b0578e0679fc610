from django.apps import AppConfig


class DatasetsConfig(AppConfig):
    name = "r1platform.datasets"
    label = "datasets"
