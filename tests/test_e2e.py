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
