"""GET /v1/jobs/{id} and /result: ownership, states and expiry (jobs staged directly, no worker)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from identity.services import customer_create
from resizer.jobs import job_create, job_fail, job_load, job_save, job_succeed, output_key
from resizer.staging import staging_store
from tests.conftest import make_image

pytestmark = pytest.mark.django_db


def staged_job(customer_id: str):
    job, _ = job_create(staging_store(), customer_id=customer_id, key_id="k", request_id="r",
                        params={"width": 10}, input_facts={"format": "jpeg"}, data=make_image())
    return job


def succeeded_job(customer_id: str, data: bytes = b"img", fmt: str = "jpeg"):
    """A staged job that succeeded with `data` as its result (by default a 3-byte JPEG), kept for 10 minutes."""
    job = staged_job(customer_id)
    return job_succeed(staging_store(), job, data=data, cpu_seconds=0.01, result_ttl_seconds=600,
                       output={"format": fmt, "width": 1, "height": 1, "bytes": len(data), "frames": 1,
                               "content_type": f"image/{fmt}"})


def test_queued_job_result_is_409(api, customer_key):
    job = staged_job(str(customer_key[0].id))
    body = api.get(f"/v1/jobs/{job.id}").json()
    assert body["status"] == "queued" and body["id"] == job.id and body["output"] is None
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 409 and response.json()["code"] == "job_not_finished"


def test_another_customers_job_is_404_not_403(api):
    other = customer_create(name="other")
    job = staged_job(str(other.id))
    for path in (f"/v1/jobs/{job.id}", f"/v1/jobs/{job.id}/result"):
        response = api.get(path)
        assert response.status_code == 404 and response.json()["code"] == "job_not_found"
    # ... and exactly what an id that never existed gets
    assert api.get("/v1/jobs/" + "f" * 32).json()["code"] == "job_not_found"
    assert api.get("/v1/jobs/not-a-uuid").json()["code"] == "job_not_found"


def test_expired_result_is_410(api, customer_key):
    store = staging_store()
    job = succeeded_job(str(customer_key[0].id))
    assert api.get(f"/v1/jobs/{job.id}/result").status_code == 200
    job.result_expires_at = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    job_save(store, job)
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 410 and response.json()["code"] == "result_expired"


def test_failed_job_result_is_409_with_the_error(api, customer_key):
    store = staging_store()
    job = staged_job(str(customer_key[0].id))
    job_fail(store, job, status=422, code="corrupt_image", detail="broken")
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 409
    assert response.json()["job_error"]["code"] == "corrupt_image"
    assert job_load(store, job.id).error["code"] == "corrupt_image"


def test_result_answers_whatever_the_accept_header(api, customer_key):
    job = succeeded_job(str(customer_key[0].id))
    for accept in ("image/*", "image/jpeg", "image/webp"):
        response = api.get(f"/v1/jobs/{job.id}/result", HTTP_ACCEPT=accept)
        assert response.status_code == 200 and response.content == b"img", accept
    assert api.get(f"/v1/jobs/{job.id}", HTTP_ACCEPT="image/*").status_code == 200


def test_unreadable_result_is_503_not_500(api, customer_key):
    store = staging_store()
    job = succeeded_job(str(customer_key[0].id))
    output = store.root / output_key(job.id)
    output.unlink()
    output.mkdir()  # reading it fails with an I/O error, not "not found"
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 503 and response.json()["code"] == "staging_unavailable"
    assert response["Retry-After"]


def test_other_spellings_of_a_job_id_are_404(api, customer_key):
    """uuid.UUID() reads dashes anywhere, braces and upper case: as a staging path a long spelling was
    a file name too long (503 staging_unavailable, "retry shortly"), and a short one another name."""
    job = staged_job(str(customer_key[0].id))
    spellings = (job.id[:2] + "-" * 300 + job.id[2:], "{" + job.id + "}", job.id.upper(),
                 "urn:uuid:" + job.id, job.id[:8] + "-" + job.id[8:])
    for spelling in spellings:
        response = api.get(f"/v1/jobs/{spelling}")
        assert response.status_code == 404 and response.json()["code"] == "job_not_found", spelling[:20]
    assert api.get(f"/v1/jobs/{job.id}").status_code == 200


def test_a_result_file_swept_before_its_expiry_is_410_with_the_jobs_location(api, customer_key):
    """Both 410s point at the job (the one for a result file gone early had no Location)."""
    store = staging_store()
    job = succeeded_job(str(customer_key[0].id))
    store.delete(output_key(job.id))
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 410 and response.json()["code"] == "result_expired"
    assert response["Location"] == f"/v1/jobs/{job.id}"


def test_a_job_whose_document_is_unreadable_is_404_not_a_500(api, customer_key):
    from resizer.jobs import _doc_key

    job = staged_job(str(customer_key[0].id))
    (staging_store().root / _doc_key(job.id)).write_bytes(b"")  # a crash right after the un-fsynced rename
    for path in (f"/v1/jobs/{job.id}", f"/v1/jobs/{job.id}/result"):
        response = api.get(path)
        assert response.status_code == 404 and response.json()["code"] == "job_not_found", path


def test_a_large_result_is_read_from_the_store_in_pieces(api, customer_key):
    """A result was read whole into the answering thread's memory: slow readers of one 58 MB result
    (within the pixel limit) took a node's memory, 115 MB a download with a 117 MB PNG (found by the
    security review). Past 1 MiB it is read in pieces as the client takes them, and a sweep deleting the
    file meanwhile does not cut the download short."""
    import os

    from controlplane.views import RESULT_STREAM_ABOVE_BYTES

    data = os.urandom(3 * 1024 * 1024)
    job = succeeded_job(str(customer_key[0].id), data, "png")
    assert len(data) > RESULT_STREAM_ABOVE_BYTES
    response = api.get(f"/v1/jobs/{job.id}/result")
    assert response.status_code == 200 and response.streaming
    assert response["Content-Length"] == str(len(data)) and response["Content-Type"] == "image/png"
    pieces = iter(response.streaming_content)
    first = next(pieces)
    assert len(first) < len(data)  # not one piece: the whole result was never in memory at once
    staging_store().delete(output_key(job.id))  # swept while the client reads
    assert first + b"".join(pieces) == data
    response.close()

    small = api.get(f"/v1/jobs/{succeeded_job(str(customer_key[0].id)).id}/result")
    assert not small.streaming and small.content == b"img"


def test_a_customer_holds_at_most_its_share_of_a_process_threads_until_its_answers_are_read(
        api, customer_key, settings, credentials):
    """Resize slots end with the job, but a client reading large results slowly (above the least rate)
    held a thread each for minutes: one customer could take every thread of every node (found by the
    security review). Its requests now hold at most CUSTOMER_MAX_THREADS of a process's threads, each
    until its answer has been written, and past that it is 429 while others are served."""
    import os

    from controlplane import admission
    from identity.services import api_key_create

    settings.CUSTOMER_MAX_THREADS = 2
    admission.customer_threads.reset()
    customer_id = str(customer_key[0].id)
    data = os.urandom(2 * 1024 * 1024)
    job = succeeded_job(customer_id, data, "png")
    try:
        slow = [api.get(f"/v1/jobs/{job.id}/result") for _ in range(2)]  # two downloads, not yet read
        assert all(r.status_code == 200 and r.streaming for r in slow)
        refused = api.get(f"/v1/jobs/{job.id}")  # any endpoint of the customer's
        assert refused.status_code == 429 and refused.json()["code"] == "customer_over_share"
        assert refused["Retry-After"] == "1"
        other = customer_create(name="someone-else")
        _, other_key = api_key_create(customer=other)
        credentials.sync(full=True)
        assert api.get(f"/v1/jobs/{staged_job(str(other.id)).id}",
                       HTTP_AUTHORIZATION=f"Bearer {other_key}").status_code == 200
        assert b"".join(slow[0].streaming_content) == data  # read to the end: its thread is given back
        slow[0].close()
        assert api.get(f"/v1/jobs/{job.id}").status_code == 200
        assert api.get("/v1/jobs/" + "0" * 32).status_code == 404  # a refusal gives its thread back too
        slow[1].close()  # the client went away: given back as well
        assert admission.customer_threads().held(customer_id) == 0
    finally:
        admission.customer_threads.reset()


@pytest.mark.parametrize("suffix", ["", "/result"])
def test_a_query_parameter_on_a_job_is_400(api, customer_key, suffix):
    """As on /v1/resize and /v1/usage: `?wait=30` (a long poll the API does not do) was ignored in silence."""
    job = succeeded_job(str(customer_key[0].id))
    response = api.get(f"/v1/jobs/{job.id}{suffix}?wait=30")
    assert response.status_code == 400 and response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "unknown_parameter" and response.json()["parameter"] == "wait"
