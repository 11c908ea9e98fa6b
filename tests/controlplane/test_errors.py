"""Every refusal is problem+json with a stable code; bad input never gets a 5xx."""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import pytest

from tests.conftest import corpus, make_image

pytestmark = pytest.mark.django_db


def resize(api, data: bytes, query: str = "width=100", **extra):
    return api.post(f"/v1/resize?{query}", data=data, content_type="application/octet-stream", **extra)


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["code"] == code
    assert body["type"].endswith(code) and body["title"] and body["detail"]
    return body


@pytest.mark.parametrize("query,code", [
    ("", "invalid_parameter"),
    ("width=0", "invalid_parameter"),
    ("width=8193", "invalid_parameter"),
    ("width=abc", "invalid_parameter"),
    ("width=-5", "invalid_parameter"),
    ("width=%C2%B2", "invalid_parameter"),  # "²": str.isdigit() says yes, int() raises
    ("width=%D9%A3", "invalid_parameter"),  # an Arabic-Indic 3: int() would take it
    ("width=" + "1" * 5000, "invalid_parameter"),  # past int()'s 4,300-digit limit
    ("width=10&height=1.5", "invalid_parameter"),
    ("width=10&fit=stretch", "invalid_parameter"),
    ("width=10&format=bmp", "invalid_parameter"),
    ("width=10&quality=0", "invalid_parameter"),
    ("width=10&quality=101", "invalid_parameter"),
    ("width=10&gravity=up", "invalid_parameter"),
    ("width=10&enlarge=maybe", "invalid_parameter"),
    ("width=10&background=notacolour", "invalid_parameter"),
    ("widht=10", "unknown_parameter"),
])
def test_bad_parameters_are_400(api, query, code):
    body = assert_problem(resize(api, make_image(), query), 400, code)
    # Each names the one at fault (no size at all: width).
    assert body["parameter"] == (query.rsplit("&", 1)[-1].split("=")[0] or "width")


def test_empty_body_is_400(api):
    assert_problem(resize(api, b""), 400, "empty_body")


def test_body_over_the_limit_is_413_from_content_length(api, settings):
    settings.MAX_UPLOAD_BYTES = 1000
    body = assert_problem(resize(api, make_image(size=(300, 300)) + b"\0" * 1000), 413, "payload_too_large")
    assert body["limit_bytes"] == 1000


@pytest.mark.parametrize("data", [
    os.urandom(4096),
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
    b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n",
    b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
    b"8BPS" + b"\0" * 100,
])
def test_not_an_image_we_open_is_415(api, data):
    assert_problem(resize(api, data), 415, "unsupported_media_type")


@pytest.mark.parametrize("data", [gzip.compress(make_image()), make_image()])
def test_a_body_with_a_content_encoding_is_415_saying_so(api, data):
    """A gzipped upload was read as the image ("Not a JPEG, PNG, ..."), and a plain one under the label was
    resized as if it had none."""
    response = resize(api, data, HTTP_CONTENT_ENCODING="gzip", HTTP_PREFER="respond-async")
    body = assert_problem(response, 415, "unsupported_media_type")
    assert "Content-Encoding" in body["detail"] and response["Accept-Encoding"] == "identity"


def test_content_encoding_identity_is_no_coding(api):
    response = resize(api, make_image(), HTTP_CONTENT_ENCODING="identity", HTTP_PREFER="respond-async")
    assert response.status_code == 202, response.content[:300]


def test_an_ico_file_is_415(api):
    assert_problem(resize(api, make_image("ICO", (32, 32))), 415, "unsupported_media_type")


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def test_declared_pixels_over_the_limit_are_422_before_decoding(api):
    # A valid little PNG whose header claims 100000 x 100000 (10 gigapixels): decoding it would
    # need 30 GB; the header check must refuse it first.
    body = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))
    assert_problem(resize(api, body), 422, "image_too_large")


def test_corrupt_header_is_422(api):
    data = bytearray(corpus("coffee.png"))
    data[20] ^= 0xFF  # inside IHDR: the CRC no longer matches
    assert_problem(resize(api, bytes(data)), 422, "corrupt_image")


def test_unknown_route_is_404_problem(api):
    assert_problem(api.get("/v1/nothing-here"), 404, "not_found")


def test_wrong_method_is_405_problem(api):
    assert_problem(api.get("/v1/resize"), 405, "method_not_allowed")


def test_malformed_multipart_is_400(api):
    response = api.post("/v1/resize?width=10", data=b"--x\r\ngarbage", content_type="multipart/form-data")
    assert_problem(response, 400, "malformed_multipart")


def test_overlong_idempotency_key_is_400(api):
    assert_problem(resize(api, make_image(), HTTP_IDEMPOTENCY_KEY="k" * 256), 400, "invalid_idempotency_key")


def test_an_empty_idempotency_key_is_400_not_no_key(api):
    """Read as no key, an empty one made a new job (billed again) on every retry of the request."""
    response = resize(api, make_image(), HTTP_IDEMPOTENCY_KEY="", HTTP_PREFER="respond-async")
    assert_problem(response, 400, "invalid_idempotency_key")


def test_the_idempotency_key_is_checked_before_the_body(api):
    """As the query's parameters: a bad key is refused without reading, sniffing or decoding the upload
    (it was checked only after them: a non-image with an overlong key was told 415)."""
    assert_problem(resize(api, b"not an image", HTTP_IDEMPOTENCY_KEY="k" * 256), 400, "invalid_idempotency_key")


def test_staging_store_away_is_503_with_retry_after(api, settings):
    settings.STAGING_URL = "file:///proc/no-staging-here"
    response = resize(api, make_image())
    body = assert_problem(response, 503, "staging_unavailable")
    assert body["detail"]
    assert response["Retry-After"] == "2"  # what the resize view answers for an upload it could not stage


def test_server_error_is_problem_json(rf):
    from controlplane.errors import handler500

    response = handler500(rf.get("/"))
    assert response.status_code == 500 and response["Content-Type"] == "application/problem+json"
    assert b'"code": "internal_error"' in response.content


def test_a_job_the_queue_refused_leaves_no_waiter_behind(api, monkeypatch, nacking_queue):
    """The request expected the job's completion notice before publishing; when the broker refuses
    the job, the expectation goes too (it leaked before: one per refused job, until the cap cleared
    every waiting request's at once). The refusal is the broker's own: a private queue that holds
    nothing (x-max-length 0, reject-publish), so RabbitMQ nacks the publish."""
    import celeryconfig
    from resizer.notify import job_waiter

    monkeypatch.setattr(celeryconfig, "PUBLISH_ATTEMPTS", 1)
    waiter = job_waiter()
    assert waiter.usable(startup_wait=10)
    before = len(waiter._events)
    response = resize(api, make_image())
    assert_problem(response, 503, "queue_unavailable")
    assert response["Retry-After"] == "2"
    assert len(waiter._events) == before


@pytest.mark.parametrize("query", ["width=abc&width=100", "width=100&width=abc", "width=10&format=webp&format=png"])
def test_a_parameter_given_twice_is_400(api, query):
    """The last value won: `?width=abc&width=100` passed and `?width=100&width=abc` failed."""
    body = assert_problem(resize(api, make_image(), query), 400, "invalid_parameter")
    assert body["parameter"] in ("width", "format")


def test_the_store_failing_after_the_job_was_accepted_answers_202_with_its_location(api, settings, monkeypatch):
    """Once published the job runs and is billed: a store error while waiting for it answered 503
    `staging_unavailable` (retry), and the client's retry made and paid for a second job."""
    from controlplane import views
    from resizer.jobs import job_load
    from resizer.staging import staging_store

    real_wait = views._wait_finished
    good_url = settings.STAGING_URL

    def store_goes_away(job_id, waiter, timeout):
        settings.STAGING_URL = "file:///proc/no-staging-here"  # the real store, unreachable from here on
        real_wait(job_id, waiter, timeout)

    monkeypatch.setattr(views, "_wait_finished", store_goes_away)
    response = resize(api, make_image())
    assert response.status_code == 202, response.content[:300]
    job_id = response.json()["id"]
    assert response["Location"] == f"/v1/jobs/{job_id}"
    settings.STAGING_URL = good_url
    assert job_load(staging_store(), job_id) is not None


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)  # the server, another process, must see the customer
def test_the_database_away_is_503_not_500():
    """A DRF view reading Postgres (usage, the management API) answered 500 internal_error. A real
    API server whose only path to Postgres runs through a proxy, cut: authentication goes on from the
    credential cache, and the usage read meets a database that is really gone."""
    import httpx
    from django.db import connection

    from identity.services import api_key_create, customer_create
    from tests.processes import TcpProxy, api_server, database_url_for_tests, wait_authenticated

    _, key = api_key_create(customer=customer_create(name="db-away"))
    proxy = TcpProxy(int(connection.settings_dict["PORT"] or 5432), connection.settings_dict["HOST"] or "127.0.0.1")
    usage = "/v1/usage?granularity=day&from=2026-11-01&to=2026-11-02"
    try:
        with api_server(API_WORKERS="1", DATABASE_URL=database_url_for_tests(port=proxy.port)) as base, \
                httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            wait_authenticated(base, key)
            assert http.get(usage).status_code == 200  # through the proxy, Postgres answers
            proxy.cut()
            response = http.get(usage)
    finally:
        proxy.close()
    assert response.status_code == 503, response.text[:300]
    assert response.headers["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 503 and body["code"] == "database_unavailable"
    assert body["type"].endswith("database_unavailable") and body["title"] and body["detail"]
    assert response.headers["Retry-After"] == "5"


def test_a_refusal_is_not_logged_again_by_django(api, caplog):
    """django.request logged every 4xx and 5xx we answered on purpose a second time (an ERROR line per
    shed 503), without the request id; the middleware's own line is the one."""
    with caplog.at_level("INFO", logger="django.request"):
        assert_problem(resize(api, make_image(), "width=0"), 400, "invalid_parameter")
    assert not [r for r in caplog.records if r.name == "django.request"]


def test_a_job_not_started_by_the_sync_deadline_reports_its_wait_to_admission(api, settings, monkeypatch):
    """Only finished jobs reported their queue wait: with every worker stalled, requests answered 202
    told the adaptive limit nothing, and it stayed at its ceiling. A private queue no worker consumes."""
    from kombu import Exchange, Queue

    import celeryconfig
    from controlplane import admission
    from controlplane.celery import app

    name = f"{celeryconfig.RESIZE_QUEUE}.stalled"
    exchange = Exchange(name, type="topic", durable=True)
    queue = Queue(name, exchange, routing_key="#", queue_arguments={"x-queue-type": "quorum"})
    monkeypatch.setattr(celeryconfig, "resize_exchange", exchange)
    monkeypatch.setattr(celeryconfig, "resize_queue", queue)
    settings.SYNC_WAIT_SECONDS = 0.3
    waits: list[float] = []
    monkeypatch.setattr(admission.admission(), "observe_queue_wait", waits.append)
    try:
        response = resize(api, make_image())
        assert response.status_code == 202 and response.json()["status"] == "queued"
        assert len(waits) == 1 and waits[0] >= 0.3
    finally:
        with app.connection_for_write() as connection:
            channel = connection.channel()
            queue.bind(channel).delete()
            exchange.bind(channel).delete()


@pytest.mark.parametrize("header,formats", [
    ("image/avif,image/webp,image/apng,*/*;q=0.8", ("avif", "webp", "*")),
    ("image/avif;q=0.1, image/webp;q=0.9", ("webp",)),
    ("image/webp;q=0.5, image/avif;q=0.5", ("webp", "avif")),
    ("image/webp;q=0, image/*;q=0", ("-webp",)),  # refused: auto never picks it
    ("image/webp;q=0, */*", ("*", "-webp")),
    ("image/avif, image/webp;q=0.9", ("avif", "~webp")),  # WebP, rated lower: only where AVIF cannot serve
    ("image/webp;q=0, image/webp;q=0.5", ("webp",)),  # named twice: the higher q counts
    ("application/json", ()),
    ("image/avif;Q=0, image/webp", ("webp", "-avif")),  # parameter names are case-insensitive (AVIF was served)
    ("image/avif;Q=0.1, image/webp;Q=0.9", ("webp",)),
    ("image/avif;q=nan, image/webp", ("webp", "-avif")),  # no number: nan ranked first
    ("image/avif;q=2, image/webp;q=1.5", ("avif", "webp")),  # read within 0..1: both 1, neither rated lower
])
def test_accept_is_read_with_its_q_values(header, formats):
    from controlplane.parsing import accepted_formats

    assert accepted_formats(header) == formats


def test_a_multipart_upload_leaves_no_copy_of_the_file_with_the_request(rf):
    """The request's own upload handlers kept the file they parsed for the request's life (the
    synchronous wait included): a second copy of every multipart upload, 25 MB at the limit."""
    import io

    from controlplane.parsing import read_upload

    upload = io.BytesIO(corpus("coffee.jpg"))
    upload.name = "coffee.jpg"
    request = rf.post("/v1/resize?width=10", {"image": upload})
    data = read_upload(request, 25 * 1024 * 1024)
    assert data == corpus("coffee.jpg")
    assert all(getattr(handler, "file", None) is None for handler in request.upload_handlers)


def _debug_page(request) -> str:
    """DEBUG's page for an exception raised and caught here: only this frame is on it."""
    import sys

    from django.views.debug import ExceptionReporter

    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        return ExceptionReporter(request, *sys.exc_info()).get_traceback_html()


def test_the_debug_error_page_hides_database_and_broker_urls(rf, settings):
    """Django hid settings named like keys and passwords, not DATABASE_URL, METERING_DATABASE_URL or an
    environment's BROKER_URL (the request variables under runserver), each with its password (found by
    the security review)."""
    import uuid

    secret = uuid.uuid4().hex  # made here: the page shows source lines and the failing frame's variables
    settings.DEBUG = True
    settings.DATABASE_URL = f"postgres://resizer:{secret}-1@db/resizer"
    settings.METERING_DATABASE_URL = f"postgres://metering:{secret}-2@db/metering"
    page = _debug_page(rf.get("/v1/jobs/x", BROKER_URL=f"amqp://resizer:{secret}-3@rabbit//"))
    assert "DATABASE_URL" in page and "RuntimeError" in page  # the page itself, with the settings listed
    assert secret not in page
