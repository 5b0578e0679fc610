from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "r1platform.accounts"
    label = "accounts"
