"""A database that answers but does not get on: a table lock held (a migration, or an operator's
transaction left open). The API's statements wait for a lock DATABASE_LOCK_TIMEOUT_SECONDS at most and
run DATABASE_STATEMENT_TIMEOUT_SECONDS at most (gunicorn.conf.py sets both for the API), so a request
that needs the table is answered 503 `database_unavailable` instead of waiting for as long as the lock is
held (the failure review of 2026-11-23: GET /v1/usage and the management API hung past 60 s). Resizes,
which need no database, are served meanwhile."""
from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest

from identity.models import Plan
from identity.services import api_key_create, customer_create
from tests.conftest import make_image
from tests.processes import api_server, database_url_for_tests, wait_authenticated

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]

# A deadline for the request, not a measurement: far above the bounds, below the lock's hold.
PATIENCE_SECONDS = 20


def test_a_table_lock_held_elsewhere_answers_503_in_time_not_a_hang():
    plan, _ = Plan.objects.get_or_create(name="reliability-unlimited", defaults={"rate_per_second": 10_000,
                                                                               "burst": 10_000})
    _, key = api_key_create(customer=customer_create(name=f"locks-{uuid.uuid4().hex[:6]}", plan=plan))
    auth = {"Authorization": f"Bearer {key}"}
    with api_server(DATABASE_LOCK_TIMEOUT_SECONDS="1") as base, \
            httpx.Client(base_url=base, timeout=PATIENCE_SECONDS, headers=auth) as http:
        wait_authenticated(base, key)
        assert http.get("/v1/usage").status_code == 200
        with psycopg.connect(database_url_for_tests()) as holder:
            holder.execute("LOCK TABLE metering_usagerollup IN ACCESS EXCLUSIVE MODE")  # held until rollback
            usage = http.get("/v1/usage")
            resize = http.post("/v1/resize?width=16", content=make_image("PNG", (32, 32)),
                               headers={"Content-Type": "image/png"})
            holder.rollback()
        assert (usage.status_code, usage.json()["code"], usage.headers["Retry-After"]) == (
            503, "database_unavailable", "5"), usage.text
        assert usage.json()["detail"] == "The database did not answer in time; retry shortly."
        assert resize.status_code == 200
        assert http.get("/v1/usage").status_code == 200


def test_an_admin_page_whose_table_is_locked_answers_503_not_500(admin_client):
    """The admin's pages are plain Django views, not DRF's: a database failure there is answered by
    controlplane.middleware (503 `database_unavailable`), as the API's views answer it, not a 500."""
    from django.db import connection

    admin_client.get("/admin/")  # the session and the user are read now, before the lock
    with psycopg.connect(database_url_for_tests()) as holder:
        holder.execute("LOCK TABLE identity_customer IN ACCESS EXCLUSIVE MODE")
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '1s'")  # as DATABASE_LOCK_TIMEOUT_SECONDS sets it in the API
        page = admin_client.get("/admin/identity/customer/")
        holder.rollback()
    assert (page.status_code, page.json()["code"]) == (503, "database_unavailable"), page.content[:300]
    assert page.json()["detail"] == "The database did not answer in time; retry shortly."
