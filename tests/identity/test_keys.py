"""API keys: issued once, stored hashed, verified in constant time, refused when wrong or revoked."""
from __future__ import annotations

import subprocess
import sys

import pytest

from identity.keys import key_hash, key_prefix
from identity.models import ApiKey, Customer
from identity.selectors import principal_for_key
from identity.services import api_key_create, api_key_revoke, customer_create
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db


def test_key_is_stored_as_prefix_and_hmac_never_in_clear():
    customer = customer_create(name="acme")
    api_key, key = api_key_create(customer=customer)
    row = ApiKey.objects.get(pk=api_key.pk)
    assert key.startswith(f"rsz_{row.prefix}_")
    assert row.secret_hash == key_hash(key)
    assert key not in (row.secret_hash, row.prefix, row.name)


def test_principal_for_valid_wrong_and_malformed_keys():
    customer = customer_create(name="acme")
    api_key, key = api_key_create(customer=customer)
    principal = principal_for_key(key=key)
    assert principal is not None
    assert (principal.customer_id, principal.key_id) == (str(customer.id), str(api_key.id))
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert principal_for_key(key=tampered) is None
    assert principal_for_key(key="not-a-key") is None
    assert key_prefix("rsz_short_x") is None


def test_revoked_key_and_suspended_customer_are_refused():
    customer = customer_create(name="acme")
    api_key, key = api_key_create(customer=customer)
    _, other_key = api_key_create(customer=customer, name="second")
    api_key_revoke(api_key=api_key)
    assert principal_for_key(key=key) is None
    assert principal_for_key(key=other_key) is not None
    Customer.objects.filter(pk=customer.pk).update(status=Customer.Status.SUSPENDED)
    assert principal_for_key(key=other_key) is None


@pytest.mark.parametrize("header", [None, "Bearer ", "Basic dXNlcjpwYXNz", "Bearer rsz_wrongwrongwr_" + "x" * 43])
def test_missing_or_wrong_key_is_401_problem(client, header):
    extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
    response = client.get("/v1/jobs/" + "0" * 32, **extra)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "unauthorized" and body["status"] == 401 and body["detail"]
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db(transaction=True)
def test_create_customer_command_prints_a_working_key_last():
    out = subprocess.run(
        [sys.executable, "manage.py", "create_customer", "Command Co"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env=_env_for_test_database(),
    ).stdout
    key = out.strip().splitlines()[-1]
    principal = principal_for_key(key=key)
    assert principal is not None
    assert Customer.objects.get(pk=principal.customer_id).name == "Command Co"


def _env_for_test_database() -> dict[str, str]:
    """The subprocess must write to the test database this test reads."""
    import os

    from django.db import connection

    s = connection.settings_dict
    return {**os.environ, "DATABASE_URL": f"postgres://{s['USER']}:{s['PASSWORD'] or ''}@{s['HOST']}:{s['PORT']}/{s['NAME']}"}
