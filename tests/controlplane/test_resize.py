"""POST /v1/resize end to end: API in-process, job on the real quorum queue, a real Celery worker."""
from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image

from tests.conftest import corpus

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("worker")]


def resize(api, data: bytes, query: str = "width=100", **headers):
    return api.post(f"/v1/resize?{query}", data=data, content_type="application/octet-stream", **headers)


def opened(response) -> Image.Image:
    return Image.open(io.BytesIO(response.content))


def test_sync_resize_returns_the_image_with_location_and_request_id(api):
    response = resize(api, corpus("photo-256k-0.jpg"), "width=256&height=256", HTTP_X_REQUEST_ID="req-123")
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == "image/jpeg"
    assert response["X-Request-Id"] == "req-123"
    assert response["Location"].startswith("/v1/jobs/")
    image = opened(response)
    assert image.format == "JPEG" and image.size == (256, 192)
    assert not image.getexif(), "metadata must be stripped"


# (fit, width, height) for the 1280x960 corpus photo -> expected size, as sharp defines each fit.
FITS = [
    ("inside", 400, 400, (400, 300)),
    ("cover", 400, 400, (400, 400)),
    ("contain", 400, 400, (400, 400)),
    ("fill", 400, 100, (400, 100)),
    ("outside", 400, 400, (533, 400)),
    ("inside", 2000, 2000, (1280, 960)),  # no upscaling unless enlarge=true
]


@pytest.mark.parametrize("fit,width,height,expected", FITS)
def test_every_fit_mode_gives_its_defined_dimensions(api, fit, width, height, expected):
    response = resize(api, corpus("photo-256k-1.jpg"), f"width={width}&height={height}&fit={fit}")
    assert response.status_code == 200, response.content[:300]
    assert opened(response).size == expected


def test_height_only_keeps_aspect(api):
    response = resize(api, corpus("photo-256k-2.jpg"), "height=96")
    assert opened(response).size == (128, 96)


@pytest.mark.parametrize("fmt,pil,content_type", [
    ("png", "PNG", "image/png"), ("webp", "WEBP", "image/webp"), ("avif", "AVIF", "image/avif"),
    ("gif", "GIF", "image/gif"), ("jpeg", "JPEG", "image/jpeg"),
])
def test_output_formats(api, fmt, pil, content_type):
    response = resize(api, corpus("rocket.webp"), f"width=120&format={fmt}&quality=70")
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == content_type
    assert opened(response).format == pil


def test_format_is_sniffed_from_bytes_not_the_label(api):
    response = api.post("/v1/resize?width=50", data=corpus("coffee.png"), content_type="image/jpeg")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"


def test_format_auto_follows_accept_and_varies(api):
    response = resize(api, corpus("chelsea.jpg"), "width=64&format=auto", HTTP_ACCEPT="image/webp,*/*")
    assert response["Content-Type"] == "image/webp"
    assert "Accept" in response["Vary"]
    response = resize(api, corpus("chelsea.jpg"), "width=64&format=auto", HTTP_ACCEPT="*/*")
    assert response["Content-Type"] == "image/jpeg"
    # Values are case-insensitive, and so is the Vary that must go with auto (a shared cache would
    # otherwise hand the WebP to a client that cannot show it).
    response = resize(api, corpus("chelsea.jpg"), "width=64&format=AUTO", HTTP_ACCEPT="image/webp,*/*")
    assert response["Content-Type"] == "image/webp" and "Accept" in response["Vary"]


def test_exif_orientation_is_applied(api):
    response = resize(api, corpus("rocket-exif-orientation-6.jpg"), "width=200&height=200")
    width, height = opened(response).size
    assert width > height, "stored sideways with orientation 6: upright it is landscape"


def test_multipart_upload(api):
    upload = io.BytesIO(corpus("coffee.jpg"))
    upload.name = "coffee.jpg"
    response = api.post("/v1/resize?width=60", data={"image": upload})
    assert response.status_code == 200, response.content[:300]
    assert opened(response).width == 60


def test_a_multipart_body_holds_the_image_only(api):
    """A parameter sent as a form field was ignored, and of two images the last was resized, in silence."""
    def upload(name: str = "coffee.jpg") -> io.BytesIO:
        part = io.BytesIO(corpus(name))
        part.name = name
        return part

    response = api.post("/v1/resize?width=60", data={"image": upload(), "height": "10"})
    assert response.status_code == 400 and response.json()["code"] == "unknown_parameter"
    assert response.json()["parameter"] == "height" and "query string" in response.json()["detail"]
    response = api.post("/v1/resize?width=60", data={"image": [upload(), upload("chelsea.jpg")]})
    assert response.status_code == 400 and response.json()["code"] == "malformed_multipart"
    response = api.post("/v1/resize?width=60", data={"image": upload(), "other": upload("chelsea.jpg")})
    assert response.status_code == 400 and response.json()["code"] == "malformed_multipart"


def test_a_broken_multipart_body_is_named_for_what_is_wrong(api):
    """A part cut short (no closing delimiter) was `missing_image`, "no file in the field 'image'", though
    the field was there; bare LF line endings read "Request max total header size exceeded", too many
    fields named a Django setting, and Django's sentences came out ending in two full stops."""
    image = corpus("coffee.jpg")

    def post(body: bytes) -> dict:
        response = api.post("/v1/resize?width=60", data=body, content_type="multipart/form-data; boundary=XyZ")
        assert response.status_code == 400
        return response.json()

    head = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    whole = head + image + b"\r\n--XyZ--\r\n"
    assert api.post("/v1/resize?width=60", data=whole, content_type="multipart/form-data; boundary=XyZ").status_code == 200
    for cut in (head + image + b"\r\n", head + image[:5000]):
        problem = post(cut)
        assert problem["code"] == "malformed_multipart" and "cut short" in problem["detail"], problem
    problem = post(whole.replace(b"\r\n", b"\n"))
    assert problem["code"] == "malformed_multipart" and "bare LF" in problem["detail"], problem
    fields = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i for i in range(1100))
    problem = post(fields + whole)
    assert problem["code"] == "malformed_multipart" and "too many fields" in problem["detail"], problem
    assert "settings" not in problem["detail"] and not problem["detail"].endswith("..")


def test_choices_are_read_whatever_their_case(api):
    response = resize(api, corpus("coffee.jpg"), "width=60&height=60&fit=Cover&format=WEBP&gravity=North")
    assert response.status_code == 200 and response["Content-Type"] == "image/webp"
    assert opened(response).size == (60, 60)


def test_multipart_without_image_field(api):
    upload = io.BytesIO(corpus("coffee.jpg"))
    upload.name = "coffee.jpg"
    response = api.post("/v1/resize?width=60", data={"file": upload})
    assert response.status_code == 400 and response.json()["code"] == "missing_image"


@pytest.mark.parametrize("prefer,status", [
    ("no-respond-async", 200),  # matched as a substring, it asked for a 202
    ("wait=10, Respond-Async", 202),
    ("respond-async; foo=bar", 202),
    ("return=minimal", 200),
])
def test_prefer_is_read_as_a_list_of_preferences(api, prefer, status):
    response = resize(api, corpus("coffee.jpg"), "width=40", HTTP_PREFER=prefer)
    assert response.status_code == status


def test_too_many_query_parameters_are_named_as_such(api):
    query = "&".join(f"p{i}=1" for i in range(1200))
    response = api.post(f"/v1/resize?{query}", data=corpus("coffee.jpg"), content_type="image/jpeg")
    assert response.status_code == 400 and response.json()["code"] == "malformed_request"
    assert "too many parameters" in response.json()["detail"]  # was "The request could not be understood."
    response = api.get("/v1/jobs/x", HTTP_HOST="not-ours.example")
    assert response.status_code == 400 and "Host header" in response.json()["detail"]


@pytest.mark.parametrize("query", ["width=300&format=png", "width=1200&format=png"])  # read whole; streamed (> 1 MiB)
def test_a_head_of_a_result_answers_its_headers_without_reading_it(api, query):
    """A HEAD read the whole result from the store (gunicorn then dropped it, and warned each time).
    Through Django's test client a HEAD's body is always dropped, so the view's answer is asked directly."""
    from controlplane.views import _job_outcome
    from resizer.jobs import job_load
    from resizer.staging import staging_store

    response = resize(api, corpus("photo-256k-3.jpg"), query)
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    job = job_load(staging_store(), response["Location"].rsplit("/", 1)[1])
    head = _job_outcome(job, head=True)
    assert not head.streaming and head.content == b"" and head["Content-Length"] == str(len(body))
    assert head["Content-Type"] == "image/png"
    assert api.head(response["Location"] + "/result")["Content-Length"] == str(len(body))


def test_respond_async_then_job_then_result(api):
    response = resize(api, corpus("photo-256k-3.jpg"), "width=300&format=png", HTTP_PREFER="respond-async")
    assert response.status_code == 202
    assert response["Cache-Control"] == "private, no-store"  # a job's state, as its GET: never cached
    location = response["Location"]
    job = response.json()
    assert location == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["params"]["width"] == 300 and job["params"]["format"] == "png"
    job = wait_finished(api, location)
    assert job["status"] == "succeeded"
    assert job["input"] == {"format": "jpeg", "width": 1280, "height": 960,
                            "bytes": len(corpus("photo-256k-3.jpg")), "frames": 1}
    assert job["output"]["width"] == 300 and job["output"]["height"] == 225 and job["output"]["format"] == "png"
    for stamp in ("created_at", "started_at", "finished_at", "result_expires_at"):
        assert job[stamp]
    result = api.get(f"{location}/result")
    assert result.status_code == 200 and result["Content-Type"] == "image/png"
    assert len(result.content) == job["output"]["bytes"]


def wait_finished(api, location: str, timeout: float = 20.0) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(location).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job at {location} did not finish")


def test_idempotency_key_returns_the_same_job(api):
    key = uuid.uuid4().hex
    first = resize(api, corpus("coffee.jpg"), "width=80", HTTP_IDEMPOTENCY_KEY=key)
    second = resize(api, corpus("coffee.jpg"), "width=80", HTTP_IDEMPOTENCY_KEY=key)
    assert first.status_code == second.status_code == 200
    assert first["Location"] == second["Location"]
    assert first.content == second.content
    third = resize(api, corpus("coffee.jpg"), "width=80")
    assert third["Location"] != first["Location"]


def test_a_replay_whose_result_expired_is_410_and_says_to_use_a_new_key(api):
    from resizer.jobs import job_load, job_save
    from resizer.staging import staging_store

    key = uuid.uuid4().hex
    first = resize(api, corpus("coffee.jpg"), "width=80", HTTP_IDEMPOTENCY_KEY=key)
    assert first.status_code == 200
    job = job_load(staging_store(), first["Location"].rsplit("/", 1)[-1])
    job.result_expires_at = "2000-01-01T00:00:00Z"
    job_save(staging_store(), job)
    for prefer in ({}, {"HTTP_PREFER": "respond-async"}):  # async, it was a 202 pointing at a 410
        again = resize(api, corpus("coffee.jpg"), "width=80", HTTP_IDEMPOTENCY_KEY=key, **prefer)
        assert again.status_code == 410 and again.json()["code"] == "result_expired"
        assert "new Idempotency-Key" in again.json()["detail"] and again["Location"] == first["Location"]
    # A result the store no longer has, though not past its retention: the same (found by review).
    from resizer.jobs import output_key

    key = uuid.uuid4().hex
    first = resize(api, corpus("coffee.jpg"), "width=81", HTTP_IDEMPOTENCY_KEY=key)
    assert staging_store().delete(output_key(first["Location"].rsplit("/", 1)[-1]))
    for prefer in ({}, {"HTTP_PREFER": "respond-async"}):
        again = resize(api, corpus("coffee.jpg"), "width=81", HTTP_IDEMPOTENCY_KEY=key, **prefer)
        assert again.status_code == 410 and again.json()["code"] == "result_expired", again.content[:200]


def test_idempotency_key_reused_for_another_request_is_422(api):
    key = uuid.uuid4().hex
    assert resize(api, corpus("coffee.jpg"), "width=80", HTTP_IDEMPOTENCY_KEY=key).status_code == 200
    response = resize(api, corpus("coffee.jpg"), "width=81", HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 422 and response.json()["code"] == "idempotency_key_reused"


def test_sync_wait_bound_answers_202_with_location(api, settings):
    settings.SYNC_WAIT_SECONDS = 0.0
    response = resize(api, corpus("photo-900k.jpg"), "width=2000&format=png")
    assert response.status_code == 202
    assert response["Location"] == f"/v1/jobs/{response.json()['id']}"
    assert wait_finished(api, response["Location"])["status"] == "succeeded"


def test_a_corrupt_image_that_passes_the_header_check_fails_as_its_job(api):
    data = corpus("photo-256k-0.jpg")
    truncated = data[: len(data) // 3]
    response = resize(api, truncated, "width=100")
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "corrupt_image"
    assert response["Location"].startswith("/v1/jobs/")
    job = api.get(response["Location"]).json()
    assert job["status"] == "failed" and job["error"]["code"] == "corrupt_image"
    result = api.get(response["Location"] + "/result")
    assert result.status_code == 409 and result.json()["code"] == "job_failed"


def test_output_over_the_pixel_limit_is_422_before_any_job_is_made(api):
    """The size is known from the header: it was refused only by the worker, after a job was made,
    queued and charged to the month's quota."""
    response = resize(api, corpus("coffee.jpg"), "width=8192&height=8192&fit=fill")
    assert response.status_code == 422 and response.json()["code"] == "output_too_large"
    assert "job_id" not in response.json() and "Location" not in response


def test_an_animated_gif_that_loops_comes_back_an_animated_avif_to_a_browser_taking_avif(api):
    """A browser's Accept (AVIF first) got a still AVIF of an animated GIF, or WebP with AVIF rated
    below it: AVIF output keeps the frames of an animation that plays forever."""
    accept = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"  # Chrome's
    response = resize(api, corpus("chelsea-animated.gif"), "width=100&format=auto", HTTP_ACCEPT=accept)
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == "image/avif" and response["Vary"] == "Accept"
    assert opened(response).n_frames == 12


@pytest.mark.parametrize("accept,expected", [
    ("image/avif,image/webp", "image/avif"), ("image/webp", "image/webp"), ("image/*", "image/jpeg"),
    ("image/png;q=0.9", "image/png"),  # the one it names (a JPEG input came back JPEG, which it did not)
    ("image/png;q=0.9, */*;q=0.1", "image/jpeg"),  # any image will do: the input's format
    ("image/avif;q=0.1, image/webp;q=0.9", "image/webp"),  # AVIF only where rated no lower than WebP
])
def test_specific_accept_headers_are_answered_not_406(api, accept, expected):
    """Accept is an input to format=auto, not a renderer choice: naming image types only (a CDN that
    normalises Accept) must still get the image, in the best format it names."""
    response = resize(api, corpus("chelsea.jpg"), "width=64&format=auto", HTTP_ACCEPT=accept)
    assert response.status_code == 200, response.content[:300]
    assert response["Content-Type"] == expected
    fixed = resize(api, corpus("chelsea.jpg"), "width=64&format=png", HTTP_ACCEPT=accept)
    assert fixed.status_code == 200 and fixed["Content-Type"] == "image/png"
    refused = resize(api, corpus("chelsea.jpg"), "width=0", HTTP_ACCEPT=accept)
    assert refused.status_code == 400 and refused["Content-Type"] == "application/problem+json"
