"""API keys and the data plane's answers: issued once, stored hashed, refused when wrong, revoked,
expired, out of scope or suspended; no database query on the request path."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest
from django.utils import timezone

from identity.dataplane import AuthFailed
from identity.keys import key_hash, key_prefix
from identity.models import ApiKey, AuditEvent, Customer
from identity.services import api_key_create, api_key_revoke, customer_create, customer_suspend
from tests.conftest import ROOT, make_image

pytestmark = pytest.mark.django_db


def test_key_is_stored_as_prefix_and_hmac_never_in_clear():
    customer = customer_create(name="acme")
    api_key, key = api_key_create(customer=customer)
    row = ApiKey.objects.get(pk=api_key.pk)
    assert key.startswith(f"rsz_{row.prefix}_")
    assert row.secret_hash == key_hash(key)
    assert key not in (row.secret_hash, row.prefix, row.name)
    assert key_prefix("rsz_short_x") is None


def test_cache_authenticates_valid_and_refuses_wrong_keys(credentials):
    customer = customer_create(name="acme")
    api_key, key = api_key_create(customer=customer)
    credentials.sync(full=True)
    principal = credentials.authenticate(key)
    assert (principal.customer_id, principal.key_id) == (str(customer.id), str(api_key.id))
    assert principal.scopes == {"resize", "jobs", "usage"}
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for wrong in (tampered, "not-a-key", "rsz_aaaaaaaaaaaa_" + "x" * 43):
        with pytest.raises(AuthFailed):
            credentials.authenticate(wrong)


def test_revocation_and_suspension_reach_the_cache_through_the_change_feed(credentials):
    customer = customer_create(name="acme")
    first, first_key = api_key_create(customer=customer)
    _, second_key = api_key_create(customer=customer, name="second")
    credentials.sync(full=True)
    api_key_revoke(api_key=first, actor="staff:ops")
    credentials.sync(full=False)  # incremental: only the feed
    with pytest.raises(AuthFailed):
        credentials.authenticate(first_key)
    assert credentials.authenticate(second_key)
    customer_suspend(customer=customer, actor="staff:ops")
    credentials.sync(full=False)
    with pytest.raises(AuthFailed) as refused:
        credentials.authenticate(second_key)
    assert refused.value.code == "customer_suspended"
    assert list(AuditEvent.objects.filter(customer=customer).values_list("action", "actor")) == [
        ("customer.suspend", "staff:ops"), ("key.revoke", "staff:ops"), ("key.issue", "system"),
        ("key.issue", "system"), ("customer.create", "system")]


def test_expired_key_is_refused(credentials):
    customer = customer_create(name="acme")
    _, key = api_key_create(customer=customer, expires_at=timezone.now() - timedelta(seconds=1))
    credentials.sync(full=True)
    with pytest.raises(AuthFailed, match="expired"):
        credentials.authenticate(key)


@pytest.mark.parametrize("header", [None, "Bearer ", "Bearer rsz_wrongwrongwr_" + "x" * 43, "Token abc"])
def test_missing_or_wrong_key_is_401_problem(client, credentials, header):
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    response = client.get("/v1/jobs/" + "0" * 32, **extra)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "unauthorized" and body["status"] == 401 and body["detail"]
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_suspended_customer_gets_403(client, credentials):
    customer = customer_create(name="acme")
    _, key = api_key_create(customer=customer)
    customer_suspend(customer=customer, actor="test")
    credentials.sync(full=True)
    response = client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 403 and response.json()["code"] == "customer_suspended"


def test_a_key_without_the_scope_is_403(client, credentials):
    customer = customer_create(name="acme")
    _, key = api_key_create(customer=customer, scopes=["jobs"])
    credentials.sync(full=True)
    response = client.post("/v1/resize?width=10", data=make_image(), content_type="image/jpeg",
                           HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 403 and response.json()["code"] == "insufficient_scope"
    assert client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {key}").status_code == 404
    usage = client.get("/v1/usage", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert usage.status_code == 403 and "'usage'" in usage.json()["detail"]


def test_a_resize_key_can_follow_the_location_its_202_gives(client, credentials):
    """A 202 hands the client a job's Location; a key with only the `resize` scope got 403 there."""
    customer = customer_create(name="resize-only")
    _, key = api_key_create(customer=customer, scopes=["resize"])
    credentials.sync(full=True)
    for path in ("/v1/jobs/" + "0" * 32, "/v1/jobs/" + "0" * 32 + "/result"):
        response = client.get(path, HTTP_AUTHORIZATION=f"Bearer {key}")
        assert response.status_code == 404 and response.json()["code"] == "job_not_found", path
    _, usage_only = api_key_create(customer=customer, scopes=["usage"])
    credentials.sync(full=True)
    refused = client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {usage_only}")
    assert refused.status_code == 403 and refused.json()["code"] == "insufficient_scope"
    assert refused.json()["detail"] == "This API key lacks the 'jobs' or 'resize' scope."


def test_the_request_path_runs_no_database_query_for_authentication(api, django_assert_num_queries):
    with django_assert_num_queries(0):
        response = api.get("/v1/jobs/" + "0" * 32)
    assert response.status_code == 404  # authenticated (not 401), and no query was made


def test_last_used_is_recorded_off_the_request_path(api, customer_key, credentials):
    key_row = ApiKey.objects.get(customer=customer_key[0])
    assert key_row.last_used_at is None
    api.get("/v1/jobs/" + "0" * 32)
    credentials.sync(full=False)
    key_row.refresh_from_db()
    assert key_row.last_used_at is not None


@pytest.mark.django_db(transaction=True)
def test_create_customer_command_prints_a_working_key_last(credentials):
    out = subprocess.run(
        [sys.executable, "manage.py", "create_customer", "Command Co"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env=_env_for_test_database(),
    ).stdout
    key = out.strip().splitlines()[-1]
    credentials.sync(full=True)
    principal = credentials.authenticate(key)
    assert Customer.objects.get(pk=principal.customer_id).name == "Command Co"


@pytest.mark.django_db(transaction=True)
def test_create_customer_with_a_key_file_prints_the_kept_key_while_it_works(credentials, tmp_path):
    """`make run` printed a new demo key on every run, and the keys piled up on the demo customer; with
    --key-file the key is kept (mode 0600) and printed again, until it stops working (revoked here)."""
    key_file = tmp_path / "var" / "demo-key"

    def run() -> str:
        out = subprocess.run(
            [sys.executable, "manage.py", "create_customer", "Kept Co", "--reuse", "--key-file", str(key_file)],
            cwd=ROOT, capture_output=True, text=True, check=True, env=_env_for_test_database()).stdout
        return out.strip().splitlines()[-1]

    first = run()
    assert key_file.read_text().strip() == first and key_file.stat().st_mode & 0o777 == 0o600
    assert run() == first
    customer = Customer.objects.get(name="Kept Co")
    assert customer.api_keys.count() == 1
    api_key_revoke(api_key=customer.api_keys.get(), actor="test")
    second = run()
    assert second != first and key_file.read_text().strip() == second
    assert customer.api_keys.filter(revoked_at__isnull=True).count() == 1
    credentials.sync(full=True)
    assert credentials.authenticate(second).customer_id == str(customer.pk)


@pytest.mark.parametrize("name", ["", "   ", "x" * 201])
def test_create_customer_refuses_a_name_the_api_refuses(name):
    """A blank name made a customer the API would have refused; 300 characters printed a DataError traceback."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="1 to 200 characters"):
        call_command("create_customer", name)


def _env_for_test_database() -> dict[str, str]:
    """The subprocess must write to the test database this test reads."""
    import os

    from django.db import connection

    s = connection.settings_dict
    return {**os.environ, "DATABASE_URL": f"postgres://{s['USER']}:{s['PASSWORD'] or ''}@{s['HOST']}:{s['PORT']}/{s['NAME']}"}
