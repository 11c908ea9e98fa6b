"""The stack as `make run` starts it: gunicorn serving the API over real HTTP, a real Celery worker,
a customer made by the management command. Covers what the in-process client cannot: streamed
(chunked) bodies, refusing a stream past the limit without reading it all, and real sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, corpus
from tests.processes import api_server, database_url_for_tests, free_port, stream_past_limit, wait_authenticated

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


@pytest.fixture
def key():
    """A key made by the management command, as a newcomer would make one."""
    out = subprocess.run([sys.executable, "manage.py", "create_customer", "e2e"], cwd=ROOT,
                         env={**os.environ, "DATABASE_URL": database_url_for_tests()},
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture
def server(key):
    with api_server(MAX_UPLOAD_BYTES=str(2 * 1024 * 1024)) as base:
        wait_authenticated(base, key)
        yield base


def test_resize_over_http_raw_multipart_and_chunked(server, key):
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=server, headers=auth, timeout=30) as http:
        raw = http.post("/v1/resize?width=256", content=corpus("photo-256k-0.jpg"))
        assert raw.status_code == 200 and raw.headers["content-type"] == "image/jpeg"
        assert raw.headers["location"].startswith("/v1/jobs/") and raw.headers["x-request-id"]
        multipart = http.post("/v1/resize?width=64&format=webp", files={"image": ("c.jpg", corpus("coffee.jpg"))})
        assert multipart.status_code == 200 and multipart.headers["content-type"] == "image/webp"

        def stream(data: bytes, size: int = 65536):
            for i in range(0, len(data), size):
                yield data[i:i + size]

        chunked = http.post("/v1/resize?width=100", content=stream(corpus("chelsea.jpg")))
        assert chunked.status_code == 200, chunked.text
        job = http.get(raw.headers["location"]).json()
        assert job["status"] == "succeeded" and job["output"]["width"] == 256


def _reply(port: int, request: bytes, half_close: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)  # the client is done sending: the body ends here
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and b'"code"' in reply:
                break
    return reply


def test_odd_bodies_over_http_get_their_own_answers(server, key):
    """What only a real server's reader shows: a chunked multipart body is parsed (it read as empty:
    400 missing_image); a chunked body with broken framing is 400 (gunicorn's parse error was a 500);
    a multipart body cut short is upload_incomplete (its part was dropped: missing_image); the media
    type in any case is multipart."""
    port = int(server.rsplit(":", 1)[1])
    head = f"POST /v1/resize?width=40 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
    image = corpus("coffee.jpg")
    part = (b"--Bnd\r\nContent-Disposition: form-data; name=\"image\"; filename=\"c.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + image + b"\r\n--Bnd--\r\n")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part[i:i + 8192]), part[i:i + 8192]) for i in range(0, len(part), 8192))
    chunked_multipart = _reply(port, (head + "Content-Type: multipart/form-data; boundary=Bnd\r\n"
                                      "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
                               + chunks + b"0\r\n\r\n")
    assert chunked_multipart.startswith(b"HTTP/1.1 200"), chunked_multipart[:300]
    mixed_case = _reply(port, (head + "Content-Type: Multipart/Form-Data; boundary=Bnd\r\n"
                               f"Content-Length: {len(part)}\r\nConnection: close\r\n\r\n").encode() + part)
    assert mixed_case.startswith(b"HTTP/1.1 200"), mixed_case[:300]
    bad_framing = _reply(port, (head + "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
                         + b"zz\r\nabc\r\n0\r\n\r\n")
    assert bad_framing.startswith(b"HTTP/1.1 400") and b"malformed_body" in bad_framing, bad_framing[:300]
    cut_short = _reply(port, (head + "Content-Type: multipart/form-data; boundary=Bnd\r\n"
                              f"Content-Length: {len(part)}\r\n\r\n").encode() + part[:len(part) // 2],
                       half_close=True)
    assert cut_short.startswith(b"HTTP/1.1 400") and b"upload_incomplete" in cut_short, cut_short[:300]


def test_streamed_body_past_the_limit_is_refused_without_reading_it_all(server, key):
    sent = stream_past_limit(server, key)  # 64 MB offered against a 2 MB limit
    assert sent < 16 * 1024 * 1024, f"the server read {sent} bytes of a refused stream"


def test_declared_length_over_the_limit_is_refused_at_once(server, key):
    with socket.create_connection(("127.0.0.1", int(server.rsplit(":", 1)[1])), timeout=10) as s:
        s.sendall(b"POST /v1/resize?width=10 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  + f"Authorization: Bearer {key}\r\nContent-Length: 900000000\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):  # the server answers and closes without reading the body
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"payload_too_large" in reply


def test_broker_away_answers_503_at_once_and_readyz_says_why(key):
    """A gunicorn whose broker is a port nothing listens on: the same as a stopped RabbitMQ, without
    stopping the one other tests share (the chaos suite stops the real one)."""
    with api_server(API_WORKERS="1", BROKER_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}//") as base:
        wait_authenticated(base, key)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            response = http.post("/v1/resize?width=50", content=corpus("coffee.jpg"))
            assert response.status_code == 503 and response.json()["code"] == "queue_unavailable"
            assert response.headers["retry-after"]
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unavailable")
            assert ready.json()["checks"]["database"] == "ok"
