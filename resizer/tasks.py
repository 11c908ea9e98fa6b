"""Celery tasks: a thin interface over resizer.services and resizer.jobs."""
from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.conf import settings

import celeryconfig
from resizer import jobs, metrics, services
from resizer.staging import StagingError, staging_store

log = logging.getLogger(__name__)


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
            headers = getattr(self.request, "headers", None) or {}
            _pause_before_requeue(headers)
            if _put_back_fresh(job_id, self.request.reply_to, headers, e):
                return  # this message is acked: a fresh one holds the job
        # Back to the queue: the delivery limit bounds how often this can repeat. A soft time limit lands
        # here only past the conversion (recording or saving the finished job): the job is not finished
        # yet, so it runs again rather than stay "running" with its message acked.
        raise Reject(str(e) or type(e).__name__, requeue=True) from e
    meter.finish(job)


# Headers of a job's message put back fresh after a store failure: when its store first failed (epoch
# seconds), and how many times it was put back since (the pause keeps doubling across fresh messages).
STORE_FAILING_SINCE = "x-resizer-store-failing-since"
STORE_RETRIES = "x-resizer-store-retries"


def requeue_delay(deliveries: int) -> float:
    """Seconds to hold a job back after its store failed, by how often it was delivered before: a
    quorum queue redelivers a requeued message at once, so without a pause a blip of the store used up
    every queued job's delivery limit within a second, and dead-lettered them all. Doubling from
    0.5 s (with jitter), capped at 8 s."""
    return min(8.0, 0.5 * 2 ** max(0, deliveries)) * random.uniform(0.5, 1.0)


def _count(headers: dict[str, Any], name: str) -> int:
    value = headers.get(name, 0)
    return value if isinstance(value, int) else 0


def _pause_before_requeue(headers: dict[str, Any]) -> None:
    try:
        time.sleep(requeue_delay(max(_count(headers, "x-delivery-count"), _count(headers, STORE_RETRIES))))
    except SoftTimeLimitExceeded:
        pass  # the task's time is up: requeue now


def _put_back_fresh(job_id: str, reply_to: str | None, headers: dict[str, Any], error: StagingError) -> bool:
    """Publish the job again as a new message (its delivery count 0), within STORE_OUTAGE_RETRY_SECONDS
    of its store's first failure; True once the broker confirmed it. The delivery limit is there to end
    jobs that kill their workers (the job's own attempt budget counts those), but a store outage, or a
    worker's full spool, longer than its pauses (~10-15 s) dead-lettered every job in flight, which then
    waited for an operator. A fresh message may also reach a worker whose disk is fine. Past the bound,
    or with the broker refusing, the job is requeued as before and the delivery limit ends it."""
    now = time.time()
    since = headers.get(STORE_FAILING_SINCE)
    since = since if isinstance(since, (int, float)) and since <= now else now
    if now - since >= celeryconfig.STORE_OUTAGE_RETRY_SECONDS:
        return False
    retries = _count(headers, STORE_RETRIES) + 1
    try:
        services.job_requeue(job_id, reply_to=reply_to, headers={STORE_FAILING_SINCE: since, STORE_RETRIES: retries})
    except Exception as e:  # the broker's errors, and the soft time limit arriving meanwhile: an exception
        # leaving the task would ack the message, with no fresh one perhaps confirmed (a copy is harmless)
        log.warning("job %s: its store failed (%s) and putting it back failed too (%r); requeued", job_id, error, e)
        return False
    log.warning("job %s: its store failed (%s); put back as a fresh message (%d since %.0f s ago)",
                job_id, error, retries, now - since)
    return True


@shared_task(name="resizer.tasks.staging_sweep", **celeryconfig.PERIODIC_TASK_LIMITS)
def staging_sweep() -> dict[str, int]:
    return jobs.staging_sweep(staging_store(), job_retention_seconds=settings.JOB_RETENTION_SECONDS)
