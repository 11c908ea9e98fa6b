"""job_run, the worker side of a job, against the real staging store and a real broker producer."""
from __future__ import annotations

import celeryconfig
from controlplane.celery import app
from resizer.jobs import FAILED, SUCCEEDED, job_create, job_load, job_save
from resizer.services import job_run
from resizer.staging import staging_store
from tests.conftest import corpus


def _job(data: bytes):
    job, _ = job_create(staging_store(), customer_id="c", key_id="k", request_id="r",
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
