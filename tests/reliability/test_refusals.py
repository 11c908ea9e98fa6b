"""Requests answered before their body is read, and headers Django cannot parse, against a real
gunicorn server: every answer is problem+json, and a refusal holds no thread for an upload's time."""
from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import make_image
from tests.processes import api_server, read_answer

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def server():
    # An upload may pause for a minute: a refusal must not wait that long for a body it will drop.
    with api_server(UPLOAD_IDLE_TIMEOUT_SECONDS="60", UPLOAD_TIMEOUT_SECONDS="120") as base:
        yield int(base.rsplit(":", 1)[1])


def _exchange(port: int, request: bytes, timeout: float) -> bytes:
    """Send `request` and keep the connection open; return what the server answers (headers and body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        return read_answer(s)


def test_a_refused_request_trickling_its_body_is_answered_without_waiting_for_it(server):
    """A 401 first read what was left of a small body, allowed a whole upload's time (here a minute
    of silence): a client with no key could hold a thread that long per request."""
    request = (b"POST /v1/resize?width=10 HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\n"
               b"Content-Length: 1000\r\n\r\n" + b"\x89PNG\r\n\x1a\n")  # 8 of the 1,000 bytes, then silence
    reply = _exchange(server, request, timeout=30)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["code"] == "unauthorized"


def test_a_keyless_body_to_the_management_api_is_answered_without_waiting_for_it(server):
    """Every body but a resize's was read before Django, whoever sent it: a client with no credentials
    could hold a thread per request for up to OTHER_BODY_TIMEOUT_SECONDS by trickling a JSON body (an
    open item of the security review). A /v1/ request with a body and no credentials is 401 at once,
    and its body is not drained after the answer either: gunicorn drained an unread body in the
    request's thread for up to 5 s (found by review). Drained, the rest of the body sent after the 401
    completed it and a next request on the connection was served (200); not drained, what follows is
    no request (gunicorn's 400, or the connection closed)."""
    head = b"POST /v1/admin/customers HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server), timeout=20) as s:
        s.sendall(head + b"Content-Length: 1000\r\n\r\n" + b'{"name": ')  # 9 of the 1,000 bytes
        reply = read_answer(s)
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        answer_head, _, body = reply.partition(b"\r\n\r\n")
        assert json.loads(body)["code"] == "unauthorized"
        assert b'www-authenticate: bearer realm="resizer"' in answer_head.lower()
        try:
            s.sendall(b"x" * 991 + b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            rest = read_answer(s)
        except (ConnectionResetError, BrokenPipeError):
            rest = b""
        assert not rest.startswith(b"HTTP/1.1 200"), rest[:200]


def test_a_body_with_a_key_the_api_does_not_know_is_answered_without_waiting_for_it(server):
    """Any Authorization header passed the check above (found by review): a made-up key is checked
    from the process's snapshot, as the view will, before the body is waited for."""
    request = (b"POST /v1/admin/customers HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Authorization: Bearer rsz_madeup_0123456789abcdef\r\nContent-Length: 1000\r\n\r\n{")
    reply = _exchange(server, request, timeout=20)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["code"] == "unauthorized"


def test_the_public_documents_keep_their_answers_to_a_keyless_body(server):
    """/v1/openapi.json and /v1/docs need no credentials: a POST there is still their 405."""
    request = (b"POST /v1/openapi.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
               b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    reply = _exchange(server, request, timeout=20)
    assert reply.startswith(b"HTTP/1.1 405"), reply[:200]


def test_a_content_type_django_cannot_parse_is_400_problem_json(server):
    """Django parses Content-Type while building the request, before any middleware: an RFC 2231
    parameter in an unknown charset escaped as gunicorn's HTML 500."""
    image = make_image()
    request = (b"POST /v1/resize?width=10 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
               b"Content-Type: image/png; x*=bogus''y\r\n" + f"Content-Length: {len(image)}\r\n\r\n".encode() + image)
    reply = _exchange(server, request, timeout=30)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"content-type: application/problem+json" in head.lower()
    assert json.loads(body)["code"] == "malformed_content_type"


def test_readyz_does_not_wait_for_a_database_that_does_not_answer(tmp_path):
    """A database that accepts connections and never answers (a partition, a host gone mid-failover)
    held /readyz for the whole 2 s connect timeout, longer than the load balancer's check interval:
    every node was taken out for an outage that should leave them serving from their snapshots."""
    import httpx

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes the handshakes; nobody ever reads or answers
    try:
        url = f"postgres://postgres@127.0.0.1:{hole.getsockname()[1]}/resizer"
        with api_server(DATABASE_URL=url, AUTH_SNAPSHOT_PATH=str(tmp_path / "snapshot.json")) as base:
            checks = httpx.get(f"{base}/readyz", timeout=30).json()["checks"]
            assert checks["database"] == "degraded: no answer in 0.5 s", checks
    finally:
        hole.close()
