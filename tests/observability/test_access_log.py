"""gunicorn's own access log is off unless API_ACCESS_LOG=true: the API logs each resize itself
(controlplane.access), and gunicorn would otherwise turn its access log on because a logging config
(JSON) is given, printing a second line for every request."""
from __future__ import annotations

import json
import tempfile
import uuid

import httpx
import pytest

from tests.processes import api_server

pytestmark = pytest.mark.e2e


def access_lines(tag: str = "", **env: str) -> list[dict]:
    """gunicorn's access log lines of a server sent three GET /healthz(?tag), and api_server's own
    probes of /healthz (as many as it took to see the server up)."""
    with tempfile.TemporaryFile() as log:
        with api_server(log=log, LOG_FORMAT="json", **env) as base:
            for _ in range(3):
                assert httpx.get(f"{base}/healthz" + (f"?{tag}" if tag else ""), timeout=5).status_code == 200
        log.seek(0)
        lines = [json.loads(line) for line in log.read().decode().splitlines() if line.startswith("{")]
    assert any(line["logger"] == "gunicorn.error" for line in lines)  # the log was captured at all
    return [line for line in lines if line["logger"] == "gunicorn.access"]


def test_gunicorn_access_log_is_off_by_default() -> None:
    assert access_lines() == []


def test_gunicorn_access_log_on_when_asked() -> None:
    tag = f"test={uuid.uuid4().hex}"  # ours, told apart from api_server's probes (one, or more on a slow start)
    lines = access_lines(tag, API_ACCESS_LOG="true")
    assert sum(f'"GET /healthz?{tag} HTTP/1.1" 200' in line["message"] for line in lines) == 3
    assert any('"GET /healthz HTTP/1.1" 200' in line["message"] for line in lines)  # and api_server's
