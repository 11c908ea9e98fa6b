"""The stack as `make run` starts it: gunicorn serving the API over real HTTP, a real Celery worker,
a customer made by the management command. Covers what the in-process client cannot: streamed
(chunked) bodies, refusing a stream past the limit without reading it all, and real sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT, corpus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(live_db_env):
    port = _free_port()
    env = {**live_db_env, "API_BIND": f"127.0.0.1:{port}", "API_WORKERS": "2", "MAX_UPLOAD_BYTES": str(2 * 1024 * 1024)}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                             "controlplane/gunicorn.conf.py"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"gunicorn did not start: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(20)


@pytest.fixture
def live_db_env():
    from django.db import connection

    s = connection.settings_dict
    url = f"postgres://{s['USER']}:{s['PASSWORD'] or ''}@{s['HOST']}:{s['PORT']}/{s['NAME']}"
    return {**os.environ, "DATABASE_URL": url}


@pytest.fixture
def key(live_db_env):
    out = subprocess.run([sys.executable, "manage.py", "create_customer", "e2e"], cwd=ROOT, env=live_db_env,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


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
    sent = 0

    def endless():
        nonlocal sent
        chunk = b"\xff" * 65536
        while sent < 64 * 1024 * 1024:  # 64 MB offered against a 2 MB limit
            sent += len(chunk)
            yield chunk

    with httpx.Client(base_url=server, timeout=30) as http:
        try:
            response = http.post("/v1/resize?width=10", content=endless(), headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server may close the connection while we are still sending: also a refusal
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


def test_broker_away_answers_503_at_once_and_readyz_says_why(live_db_env, key):
    """A gunicorn whose broker is a port nothing listens on: the same as a stopped RabbitMQ, without
    stopping the one other tests share (the chaos suite stops the real one)."""
    port = _free_port()
    env = {**live_db_env, "API_BIND": f"127.0.0.1:{port}", "API_WORKERS": "1",
           "BROKER_URL": f"amqp://guest:guest@127.0.0.1:{_free_port()}//"}
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                             "controlplane/gunicorn.conf.py"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            response = http.post("/v1/resize?width=50", content=corpus("coffee.jpg"))
            assert response.status_code == 503 and response.json()["code"] == "queue_unavailable"
            assert response.headers["retry-after"]
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unavailable")
            assert ready.json()["checks"]["database"] == "ok"
    finally:
        proc.terminate()
        proc.wait(20)
