from __future__ import annotations

from pathlib import Path

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "r1platform.core"
    label = "core"

    def ready(self) -> None:
        from django.conf import settings

        # Uploads spool next to the storage they will be moved into, so the final move is a
        # rename on the same file system rather than a second copy.
        # Whitenoise serves STATIC_ROOT once collectstatic has filled it; it must exist before.
        Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
        tmp = settings.MEDIA_ROOT / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        settings.FILE_UPLOAD_TEMP_DIR = str(tmp)
