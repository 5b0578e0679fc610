from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "r1platform.registry"
    label = "registry"
