"""r1platform: the Django project (settings, urls, Celery app) and its apps, cut by domain."""

from r1platform.celery import app as celery_app

__all__ = ["celery_app"]
