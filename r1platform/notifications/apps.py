from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "r1platform.notifications"
    label = "notifications"
