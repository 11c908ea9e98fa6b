"""Credentials no deployment can have, sent by anyone: answered as the refusals they are, never a 500.

A NUL character reached PostgreSQL from a Basic user name (the user lookup) and from the admin's
session cookie (the session lookup: `sessionid="abcdefghij\\000"`, a quoted cookie's octal escape),
and PostgreSQL refuses NUL in text (DataError): an anonymous 500 with a traceback, which pages
operators at the edge (EdgeErrorsFastBurn counts every 5xx of the public frontend). Found by the
security review of 2026-11-23."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import pytest
from django.conf import settings

from tests.conftest import ROOT


def _basic(credentials: bytes) -> str:
    return "Basic " + base64.b64encode(credentials).decode()


@pytest.mark.django_db
@pytest.mark.parametrize("credentials", [b"root\x00:x", b"root:x\x00", b"\x00:\x00"])
def test_basic_credentials_with_nul_are_401(client, credentials):
    answer = client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic(credentials))
    assert answer.status_code == 401, answer.content
    assert answer.json()["code"] == "unauthorized"


@pytest.mark.django_db
def test_a_nul_in_basic_credentials_costs_no_login_attempt(client, monkeypatch):
    """Refused before the caps: no password is checked, so nothing is counted (nor hashed)."""
    from identity.authentication import LoginFailures, StaffBasicAuthentication

    failures = LoginFailures()
    monkeypatch.setattr(StaffBasicAuthentication, "_failures", failures)
    for _ in range(3):
        client.get("/v1/admin/customers", HTTP_AUTHORIZATION=_basic(b"ops\x00:x"))
    assert failures._by_key == {}


@pytest.mark.django_db
@pytest.mark.parametrize("path, status", [("/admin/", 302), ("/v1/admin/customers", 401)])
def test_a_session_cookie_with_nul_is_no_session(client, path, status):
    # SimpleCookie quotes the value ("abcdefghij\000"); Django's cookie parser unquotes it to a NUL.
    client.cookies[settings.SESSION_COOKIE_NAME] = "abcdefghij\x00"
    assert "\\000" in client.cookies.output()
    answer = client.get(path)
    assert answer.status_code == status, answer.content


@pytest.mark.django_db
def test_a_real_session_still_works(admin_client):
    assert admin_client.get("/admin/").status_code == 200
    assert admin_client.get("/v1/admin/customers").status_code == 200


@pytest.mark.parametrize("name", ["SECRET_KEY", "API_KEY_PEPPER"])
def test_settings_refuse_the_example_placeholders(name):
    """docker/.env.example's values are public: copied as they are, compose started (it checks only that
    each is set) and the deployment ran with a SECRET_KEY and pepper anyone can read."""
    run = _django_setup(**{name: "change-me-to-a-long-random-string"})
    assert run.returncode != 0
    assert f"{name} is a placeholder" in run.stderr


def test_settings_take_a_real_secret():
    run = _django_setup(SECRET_KEY="x" * 50, API_KEY_PEPPER="y" * 50)
    assert run.returncode == 0, run.stderr


def _django_setup(**env: str) -> subprocess.CompletedProcess[str]:
    """Django set up in a process of its own, with these settings in its environment."""
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT,
                          env={**os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings", **env},
                          capture_output=True, text=True, timeout=60, check=False)
