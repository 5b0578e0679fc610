"""The bridge between the web app and `pipelines`: thin Celery tasks, device discovery, the runner."""
