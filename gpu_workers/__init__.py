"""The bridge from the web app to `pipelines`: thin Celery tasks, devices, the job runner."""
