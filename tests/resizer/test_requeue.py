"""The worker's requeue path in a real worker (resizer.tasks.resize): a delivery whose staging read
fails (StagingError, the store away, not the input gone) pauses, and is published again as a fresh
message (or, past STORE_OUTAGE_RETRY_SECONDS, rejected with requeue) and comes back; once the store
reads again the job succeeds on a later delivery, with its attempt budget given back, billed once,
and nothing dead-lettered."""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from kombu import Exchange, Queue

from controlplane.celery import app
from metering.models import UsageRecord
from resizer.jobs import Job, input_key, job_create, job_load
from resizer.staging import staging_store
from tests.conftest import corpus
from tests.processes import Worker, own_worker

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _ready(name: str) -> int:
    with app.connection_for_write() as connection:
        return Queue(name).bind(connection.channel()).queue_declare(passive=True).message_count


def _unreadable_job(tmp_path: Path) -> tuple[Job, Callable[[], None]]:
    """A staged job of a customer of its own (its records are the job's) whose input cannot be read,
    and the function that makes it readable again. The input becomes a link to a directory: reading it
    fails with IsADirectoryError, an OSError the store reports as StagingError (a missing file would be
    StagingNotFound: input_lost, no requeue)."""
    store = staging_store()
    image = corpus("coffee.jpg")
    job, _ = job_create(store, customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
                        params={"width": 50, "height": None, "fit": "inside", "format": "jpeg", "quality": None,
                                "gravity": "center", "background": None, "enlarge": False},
                        input_facts={}, data=image)
    path = store.root / input_key(job.id)
    path.unlink()
    os.symlink(tmp_path, path)

    def restore() -> None:  # the input back in one rename, so no delivery sees it missing
        restored = path.with_name(".restore")
        restored.write_bytes(image)
        os.replace(restored, path)

    return job, restore


def _send(worker: Worker, job: Job) -> None:
    app.send_task("resizer.tasks.resize", args=[job.id], task_id=job.id, time_limit=None, soft_time_limit=None,
                  exchange=Exchange(worker.queue, type="topic"), routing_key=f"{worker.queue}.job")


def _finished(job: Job, worker: Worker, deadline: float) -> Job:
    while not (done := job_load(staging_store(), job.id)).finished:
        assert time.monotonic() < deadline, worker.log_text()[-3000:]
        time.sleep(0.05)
    return done


def _billed_once(worker: Worker, job: Job) -> None:
    """Records are keyed by job id (a re-emitted one is the same row), so a second bill would be a second
    record under another id. Once the stopped worker's spool is shipped, every record it emitted is in
    the table: the customer's records are all there are."""
    worker.ship_spool()
    records = list(UsageRecord.objects.filter(customer_id=job.customer_id))
    assert [r.id for r in records] == [uuid.UUID(job.id)] and records[0].outcome == "succeeded", records


def test_a_job_whose_input_cannot_be_read_is_requeued_until_it_can_then_succeeds(tmp_path):
    job, restore = _unreadable_job(tmp_path)
    # The requeue (within the delivery limit), not a fresh message: that is the test below.
    with own_worker("requeue", STORE_OUTAGE_RETRY_SECONDS="0") as worker:
        _send(worker, job)
        received = f"resizer.tasks.resize[{job.id}] received"
        deadline = time.monotonic() + 20
        while worker.count(received) < 2:  # delivered, failed on the store, requeued, delivered again
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            assert not job_load(staging_store(), job.id).finished, job_load(staging_store(), job.id)
            time.sleep(0.05)
        restore()
        done = _finished(job, worker, deadline)
        assert done.status == "succeeded", done
        assert done.attempts == 1, done  # the deliveries the store cut short gave their attempts back
        deliveries = worker.count(received)
        # Every delivery but the last was rejected back to the queue (not lost with its worker, not failed).
        assert worker.count(f"resizer.tasks.resize[{job.id}] reject requeue=True") == deliveries - 1 >= 1
        assert _ready(f"{worker.queue}.dead") == 0 and _ready(worker.queue) == 0
    _billed_once(worker, job)
    print(f"\nrequeue after a staging read failure: {deliveries} deliveries, then succeeded; 1 usage record")


@pytest.mark.parametrize("retry_seconds", ["3600", "0"])
def test_a_store_failing_past_the_delivery_limit_puts_the_job_back_fresh_until_it_reads(tmp_path, retry_seconds):
    """With a delivery limit of 1, a requeued job is dead-lettered at its second failure: a store outage
    longer than the delivery limit's pauses dead-lettered every job in flight, to wait for an operator.
    Within STORE_OUTAGE_RETRY_SECONDS of the first failure the job is published again as a fresh message
    instead (its delivery count 0): after four failed deliveries the store reads again and the job
    succeeds, nothing dead-lettered, billed once. With 0 (never), the delivery limit ends it as before."""
    job, restore = _unreadable_job(tmp_path)
    with own_worker("refresh", DELIVERY_LIMIT="1", JOB_MAX_ATTEMPTS="1",
                    STORE_OUTAGE_RETRY_SECONDS=retry_seconds) as worker:
        _send(worker, job)
        received = f"resizer.tasks.resize[{job.id}] received"
        deadline = time.monotonic() + 30
        if retry_seconds == "0":
            while _ready(f"{worker.queue}.dead") == 0:  # two deliveries, then the broker's limit
                assert time.monotonic() < deadline, worker.log_text()[-3000:]
                time.sleep(0.1)
            assert worker.count(received) == 2 and not job_load(staging_store(), job.id).finished
            return
        while worker.count(received) < 4:  # more deliveries than the limit lets one message have
            assert time.monotonic() < deadline, worker.log_text()[-3000:]
            assert _ready(f"{worker.queue}.dead") == 0
            time.sleep(0.05)
        restore()
        done = _finished(job, worker, deadline)
        assert done.status == "succeeded", done
        assert worker.count("put back as a fresh message") >= 3
        time.sleep(0.5)  # a copy's delivery, had there been one, would be on its way
        assert _ready(f"{worker.queue}.dead") == 0 and _ready(worker.queue) == 0
    _billed_once(worker, job)
