"""Celery tasks: a thin interface over resizer.services and resizer.jobs."""
from __future__ import annotations

import random
import time
from typing import Any

from celery import shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.conf import settings

import celeryconfig
from resizer import jobs, metrics, services
from resizer.staging import StagingError, staging_store


@shared_task(name="resizer.tasks.resize", bind=True)
def resize(self, job_id: str) -> None:  # type: ignore[no-untyped-def]
    meter = metrics.TaskMeter(celeryconfig.RESIZE_QUEUE)
    try:
        with self.app.producer_or_acquire() as producer:
            job = services.job_run(job_id=job_id, reply_to=self.request.reply_to, producer=producer,
                                   replayed=meter.replayed)
    except (StagingError, SoftTimeLimitExceeded) as e:
        meter.finish(None, requeued=True)
        if isinstance(e, StagingError):
            _pause_before_requeue(self.request)
        # Back to the queue: the delivery limit bounds how often a store outage can repeat this. A soft
        # time limit lands here only past the conversion (recording or saving the finished job): the
        # job is not finished yet, so it runs again rather than stay "running" with its message acked.
        raise Reject(str(e) or type(e).__name__, requeue=True) from e
    meter.finish(job)


def requeue_delay(deliveries: int) -> float:
    """Seconds to hold a job back after its store failed, by how often it was delivered before: a
    quorum queue redelivers a requeued message at once, so without a pause a blip of the store used up
    every queued job's delivery limit within a second, and dead-lettered them all. Doubling from
    0.5 s (with jitter), capped at 8 s: the 5 deliveries of DELIVERY_LIMIT ride out ~10-15 s."""
    return min(8.0, 0.5 * 2 ** max(0, deliveries)) * random.uniform(0.5, 1.0)


def _pause_before_requeue(request: Any) -> None:
    deliveries = (getattr(request, "headers", None) or {}).get("x-delivery-count", 0)
    try:
        time.sleep(requeue_delay(deliveries if isinstance(deliveries, int) else 0))
    except SoftTimeLimitExceeded:
        pass  # the task's time is up: requeue now


@shared_task(name="resizer.tasks.staging_sweep", **celeryconfig.PERIODIC_TASK_LIMITS)
def staging_sweep() -> dict[str, int]:
    return jobs.staging_sweep(staging_store(), job_retention_seconds=settings.JOB_RETENTION_SECONDS)
