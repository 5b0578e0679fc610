"""The notifications' Celery task (found by ``app.autodiscover_tasks``): one delivery, retried."""

from __future__ import annotations

from django.conf import settings

from r1platform.celery import app
from r1platform.notifications import delivery
from r1platform.queues import TaskName


@app.task(
    bind=True,
    name=TaskName.DELIVER_NOTIFICATION.value,  # on the default queue (cpu): any worker sends it
    ignore_result=True,
    acks_late=True,
    autoretry_for=(delivery.TransientDeliveryError,),
    # BACKOFF, 2×, 4×, ... seconds with full jitter, so receivers are not stampeded.
    retry_backoff=settings.R1_WEBHOOK_BACKOFF_SECONDS,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=settings.R1_WEBHOOK_MAX_RETRIES,
    soft_time_limit=120,
    time_limit=150,
)
def deliver_notification(self, delivery_id: int) -> str:
    # On the last try a transient error fails the delivery instead of leaving it pending.
    return delivery.deliver(delivery_id, last_try=self.request.retries >= self.max_retries)
