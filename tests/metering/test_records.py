"""N resizes -> exactly N usage records and one charge each: through the API, the real queue and a
real worker (which spools and ships in the background), with replays, failures and redeliveries."""
from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal

import pytest

from controlplane.celery import app
from metering import services
from metering.models import BillingPeriod, UsageRecord
from resizer.jobs import job_create, job_load, job_start
from resizer.services import job_run
from resizer.staging import staging_store
from tests.conftest import corpus

pytestmark = pytest.mark.django_db(transaction=True)


def wait_for_records(customer_id, n: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while (found := UsageRecord.objects.filter(customer_id=customer_id).count()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def resize(api, data: bytes, query: str = "width=100", **headers):
    return api.post(f"/v1/resize?{query}", data=data, content_type="application/octet-stream", **headers)


def test_a_job_redelivered_after_its_record_was_written_finishes_as_recorded(customer, monkeypatch):
    """The first delivery timed out (a failed job), wrote its record, and then the store failed before
    the document said so: the message is requeued. The redelivery must finish the job as the record
    says, not run it again (a success then would serve an image whose only record says it failed:
    the staging table keeps the first record of an id)."""
    from celery.exceptions import SoftTimeLimitExceeded

    from resizer import imaging
    from resizer import services as resizer_services
    from resizer.staging import StagingError

    def timed_out(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    def store_failed(*args, **kwargs):
        raise StagingError("staging write failed")

    job = _job(str(customer.id))
    with monkeypatch.context() as patch:
        patch.setattr(imaging, "resize", timed_out)
        patch.setattr(resizer_services, "job_finish", store_failed)
        with app.producer_or_acquire() as producer, pytest.raises(StagingError):
            job_run(job_id=job.id, reply_to=None, producer=producer)
    assert job_load(staging_store(), job.id).status == "running"  # readers still wait
    with app.producer_or_acquire() as producer:  # the redelivery, the store and the engine well again
        job_run(job_id=job.id, reply_to=None, producer=producer)
    finished = job_load(staging_store(), job.id)
    services.usage_ship()
    record = UsageRecord.objects.get(id=job.id)
    assert finished.status == record.outcome == "failed" and finished.error["code"] == "processing_timeout"
    assert finished.attempts == record.attempts == 1


@pytest.mark.usefixtures("worker")
def test_n_resizes_make_n_records_and_one_charge_each(api, customer_key, standard_plan):
    customer = customer_key[0]
    jobs = {}
    for i in range(4):
        response = resize(api, corpus(f"photo-256k-{i}.jpg"), "width=128")
        assert response.status_code == 200, response.content[:300]
        jobs[response["Location"]] = "succeeded"
    # A retried request with the same Idempotency-Key is the same job: one record, one charge.
    first = resize(api, corpus("coffee.jpg"), "width=64", HTTP_IDEMPOTENCY_KEY="order-1")
    replay = resize(api, corpus("coffee.jpg"), "width=64", HTTP_IDEMPOTENCY_KEY="order-1")
    assert first.status_code == replay.status_code == 200 and first["Location"] == replay["Location"]
    jobs[first["Location"]] = "succeeded"
    # A job that fails in the worker is recorded too (outcome failed), and costs nothing.
    failed = resize(api, corpus("photo-256k-0.jpg")[:3000], "width=64")
    assert failed.status_code == 422 and failed.json()["code"] == "corrupt_image"
    jobs[failed["Location"]] = "failed"
    # Requests refused before a job exists make no record.
    assert resize(api, b"not an image").status_code == 415

    assert wait_for_records(customer.id, len(jobs)) == len(jobs)
    time.sleep(0.5)  # a few more shipper ticks: nothing else arrives
    records = {r.id.hex: r for r in UsageRecord.objects.filter(customer_id=customer.id)}
    assert len(records) == len(jobs) == 6
    for location, outcome in jobs.items():
        job = api.get(location).json()
        record = records[job["id"]]
        assert record.outcome == outcome and record.request_id == job["request_id"]
        assert (record.input_format, record.input_width, record.input_bytes) == (
            job["input"]["format"], job["input"]["width"], job["input"]["bytes"])
        if outcome == "succeeded":
            assert (record.output_width, record.output_bytes) == (job["output"]["width"], job["output"]["bytes"])
            assert record.cpu_seconds > 0 and record.output_megapixels > 0
        else:
            assert record.error_code == "corrupt_image" and record.output_bytes is None

    services.usage_rollup()
    start = records[next(iter(records))].event_time.date().replace(day=1)
    period_end = (start + timedelta(days=32)).replace(day=1)
    services.billing_run(today=period_end + timedelta(days=30))
    period = BillingPeriod.objects.get(customer=customer, start=start)
    lines = {line.axis: line for line in period.lines.all()}
    assert period.status == "finalized"
    assert lines["images"].quantity == 5 and lines["images"].amount_micros == 5 * 500  # the standard plan
    expected_mb = sum(r.input_bytes for r in records.values() if r.outcome == "succeeded") / Decimal(10**6)
    assert lines["input_mb"].quantity == expected_mb.quantize(Decimal("0.000001"))
    # Everything again: the same invoice, nothing appended.
    services.usage_rollup()
    services.billing_run(today=period_end + timedelta(days=30))
    assert period.lines.count() == 4 and not period.adjustments.exists()


def _job(customer_id: str):
    job, _ = job_create(staging_store(), customer_id=customer_id, key_id=customer_id, request_id="r-1",
                        params={"width": 50, "height": None, "fit": "inside", "format": "jpeg", "quality": None,
                                "gravity": "center", "background": None, "enlarge": False},
                        input_facts={"format": "jpeg", "width": 500, "height": 375, "bytes": 2000, "frames": 1},
                        data=corpus("coffee.jpg"))
    return job


def test_a_redelivered_job_is_recorded_once(customer):
    """The worker died after finishing (before its ack), so the job is delivered again; and a job
    whose first delivery died mid-task is finished by the second. One record each."""
    done_then_redelivered = _job(str(customer.id))
    died_mid_task = _job(str(customer.id))
    job_start(staging_store(), died_mid_task)  # attempt 1 started, then the worker was killed
    with app.producer_or_acquire() as producer:
        job_run(job_id=done_then_redelivered.id, reply_to=None, producer=producer)
        job_run(job_id=done_then_redelivered.id, reply_to=None, producer=producer)  # the redelivery
        job_run(job_id=died_mid_task.id, reply_to=None, producer=producer)
    services.usage_ship()
    records = {r.id.hex: r for r in UsageRecord.objects.filter(customer_id=customer.id)}
    assert set(records) == {done_then_redelivered.id, died_mid_task.id}
    assert records[died_mid_task.id].attempts == 2 == job_load(staging_store(), died_mid_task.id).attempts


def test_the_job_is_not_finished_when_its_record_cannot_be_made_durable(customer, settings, tmp_path):
    """An unwritable spool is a StagingError: the task requeues the job. Its document must not say
    finished meanwhile (a waiting request would answer with the image, unbilled); the redelivery,
    once the spool is back, finishes and records it."""
    from resizer.staging import StagingError

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    spool_dir = settings.METERING_SPOOL_DIR
    settings.METERING_SPOOL_DIR = str(blocked / "spool")
    services.local_spool.reset()  # the next emit opens a spool in the new place
    job = _job(str(customer.id))
    try:
        with app.producer_or_acquire() as producer, pytest.raises(StagingError):
            job_run(job_id=job.id, reply_to=None, producer=producer)
    finally:
        services.local_spool.reset()
    assert job_load(staging_store(), job.id).status == "running"
    settings.METERING_SPOOL_DIR = spool_dir  # the spool is back: the redelivery
    with app.producer_or_acquire() as producer:
        job_run(job_id=job.id, reply_to=None, producer=producer)
    services.local_spool.reset()
    assert job_load(staging_store(), job.id).status == "succeeded"
    services.usage_ship()
    assert UsageRecord.objects.get(id=job.id).outcome == "succeeded"


@pytest.mark.usefixtures("worker")
def test_beat_sends_the_rollup_to_a_worker():
    from metering import tasks
    from metering.models import Watermark

    tasks.usage_rollup.apply_async()  # what beat's schedule entry does
    deadline = time.monotonic() + 20
    while not Watermark.objects.filter(name="rollup").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert Watermark.objects.filter(name="rollup").exists()


def test_any_failure_to_write_the_record_requeues_the_job(customer, monkeypatch):
    """Only a SpoolError requeued: anything else (the shipper thread not starting under the worker's
    memory cap, say) failed the task, whose message is then acked, and the job stayed decided,
    running and unrecorded for good."""
    from resizer.staging import StagingError

    def no_thread():
        raise RuntimeError("can't start new thread")

    job = _job(str(customer.id))
    monkeypatch.setattr(services, "local_spool", no_thread)
    with app.producer_or_acquire() as producer, pytest.raises(StagingError):  # the task requeues on it
        job_run(job_id=job.id, reply_to=None, producer=producer)
    assert job_load(staging_store(), job.id).status == "running"
