from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "r1platform.accounts"
    label = "accounts"

    def ready(self) -> None:
        from r1platform.accounts import signals  # noqa: F401  (connects the receivers)
