from django.apps import AppConfig


class CertificationConfig(AppConfig):
    name = "r1platform.certification"
    label = "certification"
