from django.apps import AppConfig


class DeploymentsConfig(AppConfig):
    name = "r1platform.deployments"
    label = "deployments"
