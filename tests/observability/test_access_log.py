"""gunicorn's own access log is off unless API_ACCESS_LOG=true: the API logs each resize itself
(controlplane.access), and gunicorn would otherwise turn its access log on because a logging config
(JSON) is given, printing a second line for every request."""
from __future__ import annotations

import json
import tempfile

import httpx
import pytest

from tests.processes import api_server

pytestmark = pytest.mark.e2e


def access_lines(**env: str) -> list[dict]:
    with tempfile.TemporaryFile() as log:
        with api_server(log=log, LOG_FORMAT="json", **env) as base:
            for _ in range(3):
                assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        log.seek(0)
        lines = [json.loads(line) for line in log.read().decode().splitlines() if line.startswith("{")]
    assert any(line["logger"] == "gunicorn.error" for line in lines)  # the log was captured at all
    return [line for line in lines if line["logger"] == "gunicorn.access"]


def test_gunicorn_access_log_is_off_by_default() -> None:
    assert access_lines() == []


def test_gunicorn_access_log_on_when_asked() -> None:
    lines = access_lines(API_ACCESS_LOG="true")
    # Ours, and the one api_server sent to see the server up.
    assert sum('"GET /healthz HTTP/1.1" 200' in line["message"] for line in lines) == 4
