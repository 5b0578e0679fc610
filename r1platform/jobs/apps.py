from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "r1platform.jobs"
    label = "jobs"
