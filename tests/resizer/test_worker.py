"""job_run, the worker side of a job, against the real staging store and a real broker producer."""
from __future__ import annotations

import errno
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from celery.exceptions import SoftTimeLimitExceeded

import celeryconfig
from controlplane.celery import app
from resizer import imaging
from resizer.jobs import FAILED, SUCCEEDED, input_key, job_create, job_load, job_save
from resizer.services import job_run
from resizer.staging import staging_store
from tests.conftest import corpus


def _job(data: bytes):
    job, _ = job_create(staging_store(), customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
                        params={"width": 50, "height": None, "fit": "inside", "format": "jpeg", "quality": None,
                                "gravity": "center", "background": None, "enlarge": False},
                        input_facts={}, data=data)
    return job


def test_job_run_succeeds_and_a_redelivery_does_not_redo_it():
    job = _job(corpus("coffee.jpg"))
    with app.producer_or_acquire() as producer:
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
        assert done.status == SUCCEEDED and done.attempts == 1
        again = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert again.status == SUCCEEDED and again.attempts == 1 and again.finished_at == done.finished_at


def test_a_job_whose_deliveries_kept_dying_is_failed_not_retried_forever():
    job = _job(corpus("coffee.jpg"))
    job.attempts = celeryconfig.JOB_MAX_ATTEMPTS  # as if every delivery so far was killed mid-task
    job_save(staging_store(), job)
    with app.producer_or_acquire() as producer:
        job_run(job_id=job.id, reply_to=None, producer=producer)
    failed = job_load(staging_store(), job.id)
    assert failed.status == FAILED and failed.error["code"] == "processing_failed"


@pytest.mark.parametrize("raised,code", [
    (SoftTimeLimitExceeded(), "processing_timeout"),   # what Celery raises at the soft time limit
    (MemoryError(), "image_too_complex"),              # what the worker's memory bound produces
    (RuntimeError("a bug"), "internal_error"),
])
def test_job_run_turns_worker_side_failures_into_job_errors(monkeypatch, raised, code):
    def explode(*args, **kwargs):
        raise raised

    monkeypatch.setattr(imaging, "resize", explode)
    job = _job(corpus("coffee.jpg"))
    with app.producer_or_acquire() as producer:
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == FAILED and done.error["code"] == code and done.error["detail"]


def test_lost_input_fails_the_job():
    job = _job(corpus("coffee.jpg"))
    staging_store().delete(input_key(job.id))
    with app.producer_or_acquire() as producer:
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == FAILED and done.error["code"] == "input_lost"


def test_a_job_requeued_after_a_store_failure_waits_longer_each_delivery():
    """A quorum queue redelivers a requeued message at once: without a pause, a blip of the staging
    store used up every queued job's delivery limit in about a second, dead-lettering them all."""
    from resizer.tasks import requeue_delay

    for deliveries in range(8):
        low, high = 0.5 * min(8.0, 0.5 * 2 ** deliveries), min(8.0, 0.5 * 2 ** deliveries)
        assert all(low <= requeue_delay(deliveries) <= high for _ in range(50))


def test_two_deliveries_of_one_job_at_once_end_on_the_first_outcome(monkeypatch):
    """A copy of the job's message (a publish retried after its confirm was lost) runs alongside the
    first: the first finishes and drops the input, so the second finds no input. The second must not
    overwrite the succeeded job with `input_lost`."""
    from resizer import services

    job = _job(corpus("coffee.jpg"))
    read_input = services.job_input
    copies: list = []

    def input_after_the_copy_finished(store, running):
        if not copies:
            copies.append(None)  # the copy reads its input unhindered
            copies[0] = job_run(job_id=running.id, reply_to=None, producer=producer)  # and finishes first
        return read_input(store, running)

    monkeypatch.setattr(services, "job_input", input_after_the_copy_finished)
    with app.producer_or_acquire() as producer:
        late = job_run(job_id=job.id, reply_to=None, producer=producer)
    stored = job_load(staging_store(), job.id)
    assert copies[0].status == SUCCEEDED
    assert late.status == stored.status == SUCCEEDED and stored.output == copies[0].output


def _feed_fifo(path: Path, data: bytes, timeout: float = 20.0) -> None:
    """Write `data` into the FIFO at `path` for the process blocked reading it. If no reader comes
    within `timeout`, the FIFO is replaced by a regular file holding `data` (nobody is left blocked)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if time.monotonic() > deadline:
                tmp = path.with_name(".tmp-fed")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                return
            time.sleep(0.02)
            continue
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return


def test_a_publish_whose_confirm_was_lost_but_whose_job_a_worker_took_is_not_a_503(monkeypatch, worker):
    """The message reached the queue, its confirm did not reach the API (the node died in between):
    a worker runs the job. The API must not answer 503 and fail a job that runs and is billed.
    The job is held `running` (taken, not decided) while the API handles the lost confirm: its input is
    a FIFO, so the real worker blocks reading it until the test writes the image in. Were the worker
    let run, it had usually decided the job by then, and job_decide's claim answered instead of the
    "a worker took the job" branch this is about."""
    from resizer import services
    from resizer.jobs import job_decision

    image = corpus("coffee.jpg")
    held: list[Path] = []

    def published_then_confirm_lost(job_id, reply_to, timeout):
        fifo = staging_store().root / input_key(job_id)
        fifo.unlink()
        os.mkfifo(fifo)  # the worker that takes the job blocks on its input: it cannot decide it
        held.append(fifo)
        real_send(job_id, reply_to, timeout)
        deadline = time.monotonic() + 20
        while job_load(staging_store(), job_id).status == "queued":  # the worker takes it
            assert time.monotonic() < deadline
            time.sleep(0.02)
        raise TimeoutError("confirm timed out")

    real_send = services._send
    monkeypatch.setattr(services, "_send", published_then_confirm_lost)
    try:
        job, created = services.job_submit(
            customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
            params=imaging.Params(width=50), input_facts=imaging.probe(image), data=image, idempotency_key=None,
            reply_to=None)
        # Answered while the worker still held the job undecided: the job as the worker took it.
        assert job_decision(staging_store(), job.id) is None
        assert created and job.status == "running" and job.attempts == 1
    finally:
        for fifo in held:
            _feed_fifo(fifo, image)  # let the worker go on
    deadline = time.monotonic() + 20
    while not (done := job_load(staging_store(), job.id)).finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.status == SUCCEEDED


def test_a_key_is_freed_when_the_store_fails_right_after_a_publish_failure(monkeypatch, worker):
    """The API claims the job failed (503) when its publish fails; if the store then fails saving the
    document, the client's retry with the same Idempotency-Key must make a fresh job, not replay a
    job stuck queued (or, once a worker adopts the claim, its 503) for a day. The retry publishes on
    the real broker, and the real worker runs the fresh job."""
    from resizer import services
    from resizer.staging import StagingError

    def broker_away(job_id, reply_to, timeout):
        raise ConnectionRefusedError("no broker")

    def store_failed(*args, **kwargs):
        raise StagingError("disk full")

    monkeypatch.setattr(services, "_send", broker_away)
    monkeypatch.setattr(services, "job_finish", store_failed)
    customer = str(uuid.uuid4())
    submit = dict(customer_id=customer, key_id=str(uuid.uuid4()), request_id="r", params=imaging.Params(width=50),
                  input_facts=imaging.probe(corpus("coffee.jpg")), data=corpus("coffee.jpg"), idempotency_key="K",
                  reply_to=None)
    with pytest.raises(StagingError):
        services.job_submit(**submit)
    monkeypatch.undo()  # the broker is back (the real _send), and so is the store
    job, created = services.job_submit(**submit)
    assert created and job.status == "queued"
    deadline = time.monotonic() + 20
    while not (done := job_load(staging_store(), job.id)).finished:  # its message is in the queue
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert done.status == SUCCEEDED and done.customer_id == customer


def test_a_delivery_that_finishes_a_decided_job_is_counted_as_finishing_it(monkeypatch):
    """The metric said `replayed` (only re-announced) for a delivery that finished a job an earlier
    delivery had decided, because the job's finished_at came from that earlier delivery; its failure
    then never reached resizer_jobs_failed."""
    from resizer.jobs import job_decide, job_mark_failed
    from resizer.metrics import TaskMeter

    job = _job(corpus("coffee.jpg"))
    job_decide(staging_store(), job_mark_failed(job, status=422, code="processing_timeout", detail="slow"))
    meter = TaskMeter(celeryconfig.RESIZE_QUEUE)
    with app.producer_or_acquire() as producer:
        done = job_run(job_id=job.id, reply_to=None, producer=producer, replayed=meter.replayed)
        assert meter.finish(done) == "failed"
        again = TaskMeter(celeryconfig.RESIZE_QUEUE)
        assert again.finish(job_run(job_id=job.id, reply_to=None, producer=producer, replayed=again.replayed)) \
            == "replayed"


def test_a_delivery_cut_short_by_the_store_gives_its_attempt_back(monkeypatch):
    """JOB_MAX_ATTEMPTS counts deliveries the image killed: three store blips while reading the input
    failed a healthy image as processing_failed."""
    from resizer import services
    from resizer.staging import StagingError

    def store_blip(*args, **kwargs):
        raise StagingError("NFS timed out")

    job = _job(corpus("coffee.jpg"))
    with app.producer_or_acquire() as producer:
        with monkeypatch.context() as patch:
            patch.setattr(services, "job_input", store_blip)
            for _ in range(celeryconfig.JOB_MAX_ATTEMPTS):
                with pytest.raises(StagingError):
                    job_run(job_id=job.id, reply_to=None, producer=producer)
        assert job_load(staging_store(), job.id).attempts == 0
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == SUCCEEDED and done.attempts == 1


def test_a_store_failing_the_results_write_or_the_decision_gives_the_attempt_back(monkeypatch):
    """Only a failed read of the input gave the attempt back: a store failing the result's write (a
    nearly full disk: the small document writes still pass) or the outcome's record used the attempts
    up, and the fourth delivery failed a good image as 422 processing_failed."""
    from resizer import services
    from resizer.staging import StagingError

    def disk_full(*args, **kwargs):
        raise StagingError("No space left on device")

    job = _job(corpus("coffee.jpg"))
    with app.producer_or_acquire() as producer:
        for failing in ("job_mark_succeeded", "job_decide"):
            with monkeypatch.context() as patch:
                patch.setattr(services, failing, disk_full)
                for _ in range(celeryconfig.JOB_MAX_ATTEMPTS):
                    with pytest.raises(StagingError):
                        job_run(job_id=job.id, reply_to=None, producer=producer)
            assert job_load(staging_store(), job.id).attempts == 0, failing
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == SUCCEEDED and done.attempts == 1


def test_a_result_written_by_a_delivery_whose_job_ended_failed_is_deleted():
    """The API failed the job (its publish looked lost) while the message had reached the queue: the
    worker wrote the image, lost the outcome to the failure, and the bytes stayed for the job's whole
    retention (a day), where the sweep deleted only results of succeeded jobs."""
    from resizer.jobs import job_decide, job_mark_failed, output_key
    from resizer.staging import StagingNotFound

    store = staging_store()
    job = _job(corpus("coffee.jpg"))
    job_decide(store, job_mark_failed(job_load(store, job.id), status=503, code="queue_unavailable", detail="x"))
    with app.producer_or_acquire() as producer:
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == FAILED and done.error["code"] == "queue_unavailable"
    with pytest.raises(StagingNotFound):
        store.get(output_key(job.id))


def test_a_success_finished_late_is_visible_for_the_whole_result_ttl(monkeypatch, settings):
    """The expiry was counted from the decision: a job whose usage record could not be written for a
    while (its message replayed from the dead letters once the spool's disk was fixed) became visible
    already expired, a 410 for an image its customer was billed for."""
    from resizer import jobs, services
    from resizer.staging import StagingError

    settings.RESULT_TTL_SECONDS = 600
    job = _job(corpus("coffee.jpg"))

    def spool_full(**kwargs):
        raise StagingError("No space left on device")

    with app.producer_or_acquire() as producer:
        with monkeypatch.context() as patch:
            patch.setattr(services, "usage_record_emit", spool_full)
            with pytest.raises(StagingError):
                job_run(job_id=job.id, reply_to=None, producer=producer)
        decided_at = jobs._now()
        monkeypatch.setattr(jobs, "_now", lambda: decided_at + timedelta(seconds=3600))  # fixed an hour later
        done = job_run(job_id=job.id, reply_to=None, producer=producer)
    assert done.status == SUCCEEDED
    later = job_load(staging_store(), job.id)
    assert not later.result_expired(decided_at + timedelta(seconds=3600 + 599))
    assert later.result_expired(decided_at + timedelta(seconds=3600 + 601))


def test_giving_the_attempt_back_never_undoes_a_copy_that_finished_meanwhile(monkeypatch):
    """Two copies of one message ran at once; the other finished the job while this one's result write
    failed: this one's give-back saved its `running` document over the finished one."""
    from resizer import services
    from resizer.staging import StagingError

    real = services.job_mark_succeeded
    job = _job(corpus("coffee.jpg"))
    with app.producer_or_acquire() as producer:
        def the_other_copy_finishes_then_this_write_fails(*args, **kwargs):
            monkeypatch.setattr(services, "job_mark_succeeded", real)
            other = job_run(job_id=job.id, reply_to=None, producer=producer)  # the other copy, start to end
            assert other.status == SUCCEEDED
            raise StagingError("No space left on device")

        monkeypatch.setattr(services, "job_mark_succeeded", the_other_copy_finishes_then_this_write_fails)
        with pytest.raises(StagingError):
            job_run(job_id=job.id, reply_to=None, producer=producer)
    assert job_load(staging_store(), job.id).status == SUCCEEDED
