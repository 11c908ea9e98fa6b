"""Chaos on the worker side, end to end (gunicorn, the real broker, a real worker, metering to Postgres):

2. a worker child SIGKILLed in the middle of a job: the job is redelivered, completes, is billed once;
5. a job that kills its worker child every time (it runs past the hard time limit, so the child is
   killed without warning): failed by the job's attempt budget after JOB_MAX_ATTEMPTS deliveries, and,
   where that budget is set above the broker's delivery limit, dead-lettered by the broker instead.
   Either way it stops: no loop.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
from kombu import Queue

from identity.models import Customer
from identity.services import api_key_create, customer_create
from metering.models import UsageRecord
from resizer.jobs import job_load
from resizer.staging import staging_store
from tests.processes import Worker, api_server, own_worker, wait_authenticated
from tests.reliability.workers import SLOW_QUERY, slow_image

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# A worker with a hard time limit and no soft one: a job running past it has its child killed without
# warning (what a child stuck where Python cannot interrupt it, or killed by the kernel, looks like).
KILLED_AT_TWO_SECONDS = {"TASK_TIME_LIMIT": "2", "TASK_SOFT_TIME_LIMIT": "0"}


def _key() -> str:
    return _customer_key()[1]


def _customer_key() -> tuple[Customer, str]:
    customer = customer_create(name="chaos-worker")
    _, key = api_key_create(customer=customer)
    return customer, key


def _submit(base: str, key: str) -> tuple[httpx.Client, str]:
    http = httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"})
    response = http.post(f"/v1/resize?{SLOW_QUERY}", content=slow_image(), headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    return http, response.headers["location"].rsplit("/", 1)[-1]


def _wait_status(http: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.02)
    return job


def _billed(customer: Customer, worker: Worker) -> list[UsageRecord]:
    """Every usage record the customer has once the (stopped) worker's spool is shipped. Records are
    keyed by job id (a re-emitted record is the same row), so "billed twice" is a second record
    under another id: counted per customer, not looked up by the job's id."""
    worker.ship_spool()
    return list(UsageRecord.objects.filter(customer_id=customer.id))


def test_a_worker_killed_mid_task_loses_nothing_and_bills_once():
    customer, key = _customer_key()
    with own_worker("crash") as worker, api_server(API_WORKERS="1", RESIZE_QUEUE=worker.queue) as base:
        wait_authenticated(base, key)
        http, job_id = _submit(base, key)
        _wait_status(http, job_id, ("running",), 30)
        time.sleep(0.3)  # well inside the conversion
        [child] = worker.children()
        os.kill(child, signal.SIGKILL)
        killed_at = time.monotonic()
        job = _wait_status(http, job_id, ("succeeded", "failed"), 60)
        recovered = time.monotonic() - killed_at
        assert job["status"] == "succeeded", job
        result = http.get(f"/v1/jobs/{job_id}/result")
        assert result.status_code == 200 and result.headers["content-type"] == "image/png"
        assert job_load(staging_store(), job_id).attempts == 2  # the killed delivery, then the one that finished
        assert worker.count(f"resizer.tasks.resize[{job_id}] received") == 2
        assert "SIGKILL" in worker.log_text()
    records = _billed(customer, worker)  # one job, so one record: its own
    assert [r.id for r in records] == [uuid.UUID(job_id)], records
    assert records[0].outcome == "succeeded" and records[0].attempts == 2
    print(f"\nchaos worker SIGKILL: child {child} killed mid-job; redelivered and succeeded "
          f"{recovered:.1f} s later (attempts 2); 1 usage record")


def test_a_job_that_always_kills_its_worker_is_failed_after_its_attempt_budget():
    import celeryconfig

    customer, key = _customer_key()
    with own_worker("poison", **KILLED_AT_TWO_SECONDS) as worker, \
            api_server(API_WORKERS="1", RESIZE_QUEUE=worker.queue) as base:
        wait_authenticated(base, key)
        started = time.monotonic()
        http, job_id = _submit(base, key)
        job = _wait_status(http, job_id, ("succeeded", "failed"), 60)
        gave_up = time.monotonic() - started
        assert job["status"] == "failed" and job["error"]["code"] == "processing_failed", job
        time.sleep(3)  # longer than one more delivery would take to show up
        deliveries = worker.count(f"resizer.tasks.resize[{job_id}] received")
        kills = worker.count("Hard time limit (2s) exceeded")
        assert deliveries == celeryconfig.JOB_MAX_ATTEMPTS + 1  # 3 killed, the 4th fails the job and acks
        assert kills == celeryconfig.JOB_MAX_ATTEMPTS
        assert _ready(f"{worker.queue}.dead") == 0 and _ready(worker.queue) == 0
    records = _billed(customer, worker)
    assert [r.id for r in records] == [uuid.UUID(job_id)] and records[0].outcome == "failed"  # recorded, and free
    print(f"\nchaos poison job (attempt budget): {kills} children killed at the hard time limit, "
          f"{deliveries} deliveries, failed processing_failed after {gave_up:.1f} s; nothing dead-lettered")


def test_past_the_brokers_delivery_limit_a_crashing_job_is_dead_lettered():
    """The backstop: an attempt budget above the broker's delivery limit (as when the job document
    cannot be written), so the broker is what stops it."""
    queue_arguments = {"JOB_MAX_ATTEMPTS": "10", "DELIVERY_LIMIT": "2"}  # the API declares the same queue
    key = _key()
    with own_worker("deadletter", **KILLED_AT_TWO_SECONDS, **queue_arguments) as worker, \
            api_server(API_WORKERS="1", RESIZE_QUEUE=worker.queue, **queue_arguments) as base:
        wait_authenticated(base, key)
        started = time.monotonic()
        http, job_id = _submit(base, key)
        dead = f"{worker.queue}.dead"
        deadline = time.monotonic() + 60
        while _ready(dead) < 1:
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            time.sleep(0.1)
        dead_lettered = time.monotonic() - started
        time.sleep(3)
        deliveries = worker.count(f"resizer.tasks.resize[{job_id}] received")
        assert deliveries == 2 + 1  # DELIVERY_LIMIT + 1, then the broker stops delivering it
        assert _ready(worker.queue) == 0
        message = _get(dead)
        assert message.headers["id"] == job_id  # the job's id, for an operator to look up
    print(f"\nchaos poison job (delivery limit): {deliveries} deliveries, dead-lettered to {dead} after "
          f"{dead_lettered:.1f} s")


def _ready(name: str) -> int:
    from controlplane.celery import app

    with app.connection_for_write() as connection:
        try:
            return Queue(name).bind(connection.channel()).queue_declare(passive=True).message_count
        except Exception:
            return -1


def _get(name: str):  # type: ignore[no-untyped-def]
    from controlplane.celery import app

    with app.connection_for_write() as connection:
        message = Queue(name).bind(connection.channel()).get(no_ack=True, accept=["json"])
        assert message is not None
        return message
