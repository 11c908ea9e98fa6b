"""A worker child's memory bound: an image that needs more than the cap fails its own job with
`image_too_complex`; the worker lives on and serves the next job."""
from __future__ import annotations

import io
import time
import uuid

import pytest
from kombu import Exchange, Queue
from PIL import Image

from controlplane.celery import app
from resizer.jobs import job_create, job_load
from resizer.staging import staging_store
from tests.conftest import corpus
from tests.processes import own_worker

# The worker ships its jobs' usage records to the test database: without a test using the database,
# pytest-django sets none up, and (this file run alone) they went to the database it is named after.
pytestmark = pytest.mark.django_db(transaction=True)


def _big_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7000, 7000), (10, 120, 200)).save(buf, "PNG", compress_level=1)  # 49 MP, under the limit
    return buf.getvalue()


@pytest.fixture
def small_worker():
    """A worker of its own whose child may map 250 MiB (~120 at rest): too little for a 49 MP decode."""
    with own_worker("memory", WORKER_MAX_ADDRESS_SPACE_MIB="250") as worker:
        yield Queue(worker.queue, Exchange(worker.queue, type="topic"), routing_key=f"{worker.queue}.#",
                    no_declare=True)


def _run(queue: Queue, data: bytes, width: int) -> str:
    job, _ = job_create(staging_store(), customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
                        params={"width": width, "height": None, "fit": "inside", "format": "jpeg", "quality": None,
                                "gravity": "center", "background": None, "enlarge": False},
                        input_facts={}, data=data)
    app.send_task("resizer.tasks.resize", args=[job.id], task_id=job.id, exchange=queue.exchange,
                  routing_key=f"{queue.name}.job")
    deadline = time.monotonic() + 60
    while not (current := job_load(staging_store(), job.id)).finished:
        assert time.monotonic() < deadline, f"job still {current.status}"
        time.sleep(0.1)
    return current


def test_an_image_over_the_memory_cap_fails_its_job_and_the_worker_goes_on(small_worker):
    failed = _run(small_worker, _big_png(), 100)
    assert failed.status == "failed", failed
    # One delivery: the child raised MemoryError and failed the job; it was not killed (a child that
    # died would have had its job delivered again, and given up on as processing_failed).
    assert failed.error["code"] == "image_too_complex" and failed.attempts == 1, failed
    ok = _run(small_worker, corpus("coffee.jpg"), 50)
    assert ok.status == "succeeded"
