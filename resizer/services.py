"""The resize workflow: submit a job (API side) and run it (worker side)."""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from amqp.exceptions import AMQPError, MessageNacked
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from kombu import Producer
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError

import celeryconfig
from controlplane import logs
from resizer import broker_alarm, imaging
from resizer.jobs import (
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    job_by_idempotency_key,
    job_create,
    job_decide,
    job_decision,
    job_finish,
    job_input,
    job_load,
    job_mark_failed,
    job_mark_succeeded,
    job_release_idempotency,
    job_save,
    job_start,
    output_key,
)
from metering.services import usage_record_emit
from resizer.notify import job_notify
from resizer.staging import StagingError, StagingNotFound, StagingStore, staging_store

log = logging.getLogger(__name__)

# Every failure to hand a job to the broker (down, unreachable, nacked, confirm timed out).
PUBLISH_ERRORS = (KombuError, AMQPError, MessageNacked, OSError, TimeoutError, broker_alarm.BrokerBlocked)


# celeryconfig.task_routes sends resizer.tasks.* with this key (the queue binds resize.#).
RESIZE_ROUTING_KEY = celeryconfig.task_routes["resizer.tasks.*"]["routing_key"]


class QueueUnavailable(Exception):
    """The job could not be handed to the queue; nothing was accepted."""


def engine_limits() -> imaging.Limits:
    return imaging.Limits(max_input_bytes=settings.MAX_UPLOAD_BYTES, max_pixels=settings.MAX_INPUT_PIXELS,
                          max_output_bytes=settings.MAX_OUTPUT_BYTES)


def job_submit(
    *,
    customer_id: str,
    key_id: str,
    request_id: str,
    params: imaging.Params,
    input_facts: imaging.ImageFacts,
    data: bytes,
    idempotency_key: str | None,
    reply_to: str | None,
    before_publish: Callable[[str], None] | None = None,
) -> tuple[Job, bool]:
    """Stage the upload and publish the job (confirmed by the broker). Returns (job, created).
    `before_publish(job_id)` runs just before the publish, so a waiter cannot miss the completion."""
    store = staging_store()
    job, created = job_create(
        store,
        customer_id=customer_id,
        key_id=key_id,
        request_id=request_id,
        params=_job_params(params),
        input_facts={k: getattr(input_facts, k) for k in ("format", "width", "height", "bytes", "frames")},
        data=data,
        idempotency_key=idempotency_key,
    )
    if not created:
        return job, False
    if before_publish is not None:
        before_publish(job.id)
    try:
        _publish(_send, job.id, reply_to)
    except PUBLISH_ERRORS as e:
        # A publish whose confirm was lost (its node died after the message was replicated) may have
        # reached the queue all the same, and kombu's reconnecting retries can put a copy there too:
        # a worker that already took the job means the queue has it.
        current = job_load(store, job.id)
        if current is not None and current.status != QUEUED:
            log.warning("job %s: the publish failed (%s) but a worker took the job", job.id, e)
            return current, True
        # The failure is claimed like any outcome: a worker that decided first wins (then the queue had
        # the job: it is served), and one that decides later finishes the job failed, as answered here.
        failed, ours = job_decide(store, job_mark_failed(replace(job), status=503, code="queue_unavailable",
                                                         detail="The job queue did not accept the job."))
        if not ours:
            log.warning("job %s: the publish failed (%s) but a worker decided the job", job.id, e)
            return job, True
        log.warning("job %s not accepted by the broker: %s", job.id, e)
        # The key first: if the store fails now, the client's retry must still make a fresh job, not
        # replay this one's failure (the claim above already holds it).
        if idempotency_key is not None:
            job_release_idempotency(store, customer_id=customer_id, idempotency_key=idempotency_key)
        job_finish(store, failed)
        raise QueueUnavailable(str(e)) from e
    return job, True


def job_requeue(job_id: str, *, reply_to: str | None = None, headers: dict[str, Any] | None = None) -> None:
    """Publish an existing (staged, unfinished) job to the resize queue again, confirmed by the broker:
    an operator's way back for a dead-lettered job (`manage.py dead_letters requeue`), and a worker's
    for a job its store failed (resizer.tasks, with `headers` of its own)."""
    _publish(partial(_send, extra_headers=headers), job_id, reply_to)


def _job_params(params: imaging.Params) -> dict[str, Any]:
    return {k: v for k, v in vars(params).items() if k != "accept"}  # flat: no asdict() deep copy


def job_replay(*, customer_id: str, params: imaging.Params, data: bytes, idempotency_key: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key made (the same request: else
    IdempotencyConflict), or None. Only looks: never makes a job."""
    return job_by_idempotency_key(staging_store(), customer_id=customer_id, idempotency_key=idempotency_key,
                                  params=_job_params(params), data=data)


def _nacked(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, MessageNacked):
            return True
        error = error.__cause__ or error.__context__
    return False


def _send(job_id: str, reply_to: str | None, timeout: float, extra_headers: dict[str, Any] | None = None) -> None:
    """Publish the resize task's message and wait for the broker's confirm. The message is the one
    `apply_async` sends (Celery's task protocol 2, built by Celery's own `as_task_v2`), published on a
    pooled producer without apply_async's routing lookup, signals and result object: 0.2 ms less CPU
    per job (docs/BENCHMARKS.md). No time limits in the message: the worker that runs the job applies
    its own (TASK_TIME_LIMIT, TASK_SOFT_TIME_LIMIT), not whatever the publishing API node has."""
    from controlplane.celery import app
    from resizer.tasks import resize

    headers, properties, body, _ = app.amqp.as_task_v2(
        job_id, resize.name, args=[job_id], kwargs={}, reply_to=reply_to, ignore_result=True,
        argsrepr=f"['{job_id}']", kwargsrepr="{}", time_limit=None, soft_time_limit=None)
    if extra_headers:
        headers.update(extra_headers)
    logs.task_headers_add(headers)  # the worker logs the job under the request's id
    try:
        with app.producer_or_acquire() as producer:
            _publish_on(producer, body, headers, properties, timeout)
    except broker_alarm.BrokerBlocked:
        # A pooled connection may read a `connection.blocked` sent before the alarm cleared (its
        # `unblocked` queued behind it), and so may the next one the pool hands out: once more on a
        # connection of its own, which a standing alarm blocks at its first publish. Blocked again, the
        # job is refused at once (not after PUBLISH_TIMEOUT_SECONDS).
        log.info("job %s: the broker blocked publishing (a resource alarm?); trying a connection of its own", job_id)
        connection = app.connection_for_write()
        try:
            _publish_on(Producer(connection), body, headers, properties, timeout)
        except broker_alarm.BrokerBlocked:
            broker_alarm.refused()
            raise
        finally:
            connection.release()  # after collect() nothing is left to close; else the handshake is answered
    broker_alarm.published()


def _publish_on(producer: Any, body: Any, headers: dict[str, Any], properties: dict[str, Any], timeout: float) -> None:
    """One publish of a job's message on `producer`, and its confirm."""
    from controlplane.celery import app

    # The queue is declared on a connection's first publish: a message to an exchange with no
    # queue bound would be confirmed and dropped. kombu remembers the declaration per connection
    # (and forgets it on reconnect), but asked to declare it copies and binds the queue on every
    # publish first (~0.1 ms); the same cache, read here, skips that.
    declared = hash(celeryconfig.resize_queue) in (producer.connection.declared_entities or ())
    try:
        with broker_alarm.publishing:
            producer.publish(
                body, exchange=celeryconfig.resize_exchange, routing_key=RESIZE_ROUTING_KEY,
                declare=[] if declared else [celeryconfig.resize_queue], serializer="json", headers=headers,
                delivery_mode=2,
                retry=app.conf.task_publish_retry, retry_policy=_retry_policy(app.conf.task_publish_retry_policy),
                timeout=timeout, confirm_timeout=timeout, **properties)
    except (broker_alarm.BrokerBlocked, TimeoutError, KombuOperationalError):
        # Dropped, not closed: a broker that stopped reading this connection (an alarm) never
        # answers the close handshake, which waited without end as the pool replaced it; and a
        # connection whose confirm never came must not go back to the pool, where the late ack
        # would pass for the next publish's (kombu's retries report a timeout as OperationalError).
        producer.connection.collect()
        raise


def _retry_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """kombu's retry policy for one publish, with nacks retried on the same connection. py-amqp counts
    a nack among the recoverable *connection* errors, so kombu answered each one by dropping the
    connection, switching to the next listed node (perhaps the dead one) and publishing again: up to
    3 new connections a send, 15 a job under _publish's attempts, in every API process at once during
    a leader election. In `retry_errors` a nack is retried at once on its channel instead, up to the
    policy's max_retries; _publish's backoff comes between sends."""
    return {**policy, "retry_errors": (MessageNacked,)}


def _publish(send: Callable[[str, str | None, float], None], job_id: str, reply_to: str | None, *,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Hand the job to the broker with `send` and wait for its confirm. A nack (the broker up but the
    queue not taking messages: between leaders) is retried here, within PUBLISH_TIMEOUT_SECONDS, with
    exponential backoff and jitter (`sleep` takes each pause; tests pass their own). Connection failures,
    and a confirm that did not come in time, were already retried by kombu over every listed node
    (task_publish_retry_policy: up to 3 tries of the timeout each), so those raise at once. A retried
    publish whose first confirm was lost can leave two copies of the message: a job's deliveries
    converge on one outcome (_job_conclude)."""
    deadline = time.monotonic() + celeryconfig.PUBLISH_TIMEOUT_SECONDS
    for attempt in range(celeryconfig.PUBLISH_ATTEMPTS):
        try:
            send(job_id, reply_to, max(0.1, deadline - time.monotonic()))
            return
        except PUBLISH_ERRORS as e:
            step = celeryconfig.PUBLISH_RETRY_BASE_SECONDS * 2**attempt
            delay = step / 2 + random.uniform(0, step / 2)  # "equal jitter": spread, yet always some wait
            if not _nacked(e) or attempt + 1 >= celeryconfig.PUBLISH_ATTEMPTS or \
                    time.monotonic() + delay >= deadline:
                raise
            log.info("job %s nacked by the broker (attempt %d); retrying in %.2f s", job_id, attempt + 1, delay)
            sleep(delay)


def job_run(*, job_id: str, reply_to: str | None, producer: Any,
            replayed: Callable[[], None] | None = None) -> Job | None:
    """Run one delivery of a job. Safe to repeat: a finished job is only re-announced (and `replayed`
    called)."""
    store = staging_store()
    job = job_load(store, job_id)
    if job is None:
        log.warning("job %s has no document (expired or never staged); dropping its message", job_id)
        return None
    if job.finished:
        usage_record_emit(job=job)  # durable before anyone hears the job finished
        job_notify(producer=producer, reply_to=reply_to, job_id=job.id, status=job.status)
        if replayed is not None:
            replayed()
        return job
    # An earlier delivery decided it (and may have recorded it): finish as decided. Only a job some
    # delivery started can have one worth the read; the API's claim on a queued job (its publish
    # looked lost) stands anyway, as _job_conclude adopts it.
    if job.status != QUEUED and (decided := job_decision(store, job.id)) is not None:
        return _job_conclude(store, decided, producer=producer, reply_to=reply_to)
    if job.attempts >= celeryconfig.JOB_MAX_ATTEMPTS:
        # Every earlier delivery died mid-task (a worker killed by the image or by its limits).
        job_mark_failed(job, status=422, code="processing_failed",
                        detail=f"The image stopped the worker {job.attempts} times and was given up on.")
        return _job_conclude(store, job, producer=producer, reply_to=reply_to)
    job_start(store, job)
    running = replace(job)  # the document as saved now, for giving the attempt back
    try:
        _job_process(store, job)
        decided, _ = job_decide(store, job)
    except StagingError:
        _job_give_attempt_back(store, running)
        raise
    return _job_finish_decided(store, decided, producer=producer, reply_to=reply_to)


def _job_process(store: StagingStore, job: Job) -> None:
    """Resize the job's input and mark the job, in memory, succeeded (its result stored) or failed.
    Raises StagingError when the store is away (the task requeues the job)."""
    try:
        data = job_input(store, job)
        result = imaging.resize(data, imaging.Params(**job.params), engine_limits())
    except imaging.ImageError as e:
        job_mark_failed(job, status=e.status, code=e.code, detail=e.message)
    except SoftTimeLimitExceeded:
        job_mark_failed(job, status=422, code="processing_timeout",
                        detail="The image took longer to process than the time limit allows.")
    except MemoryError:
        job_mark_failed(job, status=422, code="image_too_complex",
                        detail="The image needs more memory to process than a worker may use.")
    except StagingNotFound:
        job_mark_failed(job, status=500, code="input_lost", detail="The uploaded image was lost before processing.")
    except StagingError:
        raise
    except Exception:
        log.exception("job %s failed on a bug", job.id)
        job_mark_failed(job, status=500, code="internal_error", detail="The job failed on a server error.")
    else:
        out = result.output
        job_mark_succeeded(
            store,
            job,
            data=result.data,
            output={"format": out.format, "width": out.width, "height": out.height, "bytes": out.bytes,
                    "frames": out.frames, "content_type": result.content_type},
            cpu_seconds=result.cpu_seconds,
            result_ttl_seconds=settings.RESULT_TTL_SECONDS,
        )


def _job_give_attempt_back(store: StagingStore, running: Job) -> None:
    """The store failed this delivery (reading the input, writing the result, recording the outcome):
    the attempt budget is for deliveries the image killed, so this one is given back if the store lets
    us (best effort). Until 2026-11-22 only a failed read gave it back: a store failing the result's
    write (a full disk: the small document writes still pass) used the attempts up, and a good image
    ended 422 processing_failed. Only over a document still as this delivery left it: a copy of the
    message running at the same time may have finished the job meanwhile, and saving `running` over
    that made it `running` again until a later delivery concluded it."""
    running.attempts -= 1
    try:
        current = job_load(store, running.id)
        if current is not None and current.status == RUNNING and current.started_at == running.started_at \
                and job_decision(store, running.id) is None:
            job_save(store, running)
    except StagingError:
        pass


def _job_conclude(store: StagingStore, job: Job, *, producer: Any, reply_to: str | None) -> Job:
    """Decide, record, reveal, then announce a job finished in memory. The outcome is claimed first
    (job_decide, atomic): another delivery of the job (a copy of its message, or a redelivery while
    the first still ran) or the API (failing a publish that looked lost) may have decided it already,
    and then that outcome stands and this delivery finishes the job as it says. The usage record is
    made durable before the document says finished: a waiting request answers as soon as it reads
    that (it re-reads the document each second), so no image is ever served without its record. If the
    worker dies or the store fails between the record and the document, the redelivery finishes the
    job as decided, and writes the same record (the staging table keeps the first of an id). A spool
    that cannot be written raises (a StagingError: the task requeues the job)."""
    decided, _ = job_decide(store, job)
    return _job_finish_decided(store, decided, producer=producer, reply_to=reply_to)


def _job_finish_decided(store: StagingStore, job: Job, *, producer: Any, reply_to: str | None) -> Job:
    """Record, reveal, then announce a job as job_decide returned it. A result written by a delivery
    whose outcome lost to a failure is deleted: image bytes are kept only to be fetched (the sweep
    deletes any left)."""
    usage_record_emit(job=job)
    if job.status != SUCCEEDED:
        try:
            store.delete(output_key(job.id))
        except StagingError as e:
            log.warning("job %s failed; its stray result stays for the sweep: %s", job.id, e)
    job_finish(store, job, result_ttl_seconds=settings.RESULT_TTL_SECONDS)
    job_notify(producer=producer, reply_to=reply_to, job_id=job.id, status=job.status)
    return job
