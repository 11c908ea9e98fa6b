"""How long ago beat's metering jobs last succeeded, on the API's /metrics: the age of each job's
watermark row (rollup, billing, and the archive's, which a complete archive run writes), with the
interval beat runs it at; read at scrape time in one bounded query, and a scrape that still answers,
without ages, when Postgres is away."""
from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from metering import services
from metering.models import Watermark
from tests.processes import TcpProxy, api_server, database_url_for_tests

pytestmark = pytest.mark.django_db(transaction=True)

AGE = "resizer_periodic_last_success_age_seconds"
INTERVAL = "resizer_periodic_interval_seconds"


def _by_task(text: str, name: str) -> dict[str, float]:
    return {s.labels["task"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name}


def _db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def test_ages_of_the_last_successful_runs_are_on_metrics(client, settings, tmp_path):
    settings.STAGING_URL = f"file://{tmp_path}"  # a store no sweep has run on
    # No job ran yet: no age (not 0, not a made-up one); the intervals are there.
    page = client.get("/metrics").content.decode()
    assert _by_task(page, AGE) == {}
    assert _by_task(page, INTERVAL) == {"usage_rollup": 60.0, "billing_run": 300.0, "usage_archive": 3600.0,
                                        "staging_sweep": 60.0}

    services.usage_rollup()
    services.usage_archive()
    # A billing run 20 minutes ago, by the database's clock.
    Watermark.objects.update_or_create(name="billing", defaults={"value": _db_now() - timedelta(minutes=20)})
    ages = _by_task(client.get("/metrics").content.decode(), AGE)
    assert set(ages) == {"usage_rollup", "billing_run", "usage_archive"}
    assert 0 <= ages["usage_rollup"] < 30 and 0 <= ages["usage_archive"] < 30
    assert 1200 <= ages["billing_run"] < 1230
    # Ages grow between runs.
    time.sleep(1.1)
    assert _by_task(client.get("/metrics").content.decode(), AGE)["usage_rollup"] >= ages["usage_rollup"] + 1


def test_the_staging_sweeps_age_is_on_metrics(client, settings, tmp_path):
    """The sweep keeps no watermark in Postgres: it left no trace, so a sweep that stopped showed only
    as the staging filesystem filling up. Each finished sweep now writes a mark in the store."""
    import os

    from resizer.jobs import SWEEP_MARK_KEY, staging_sweep
    from resizer.staging import staging_store

    settings.STAGING_URL = f"file://{tmp_path}"
    assert "staging_sweep" not in _by_task(client.get("/metrics").content.decode(), AGE)
    staging_sweep(staging_store(), job_retention_seconds=3600)
    fresh = _by_task(client.get("/metrics").content.decode(), AGE)["staging_sweep"]
    assert fresh >= 0
    # The last sweep finished ten minutes before that (beat stopped since): the age says so.
    mark = tmp_path / SWEEP_MARK_KEY
    finished = mark.stat().st_mtime
    os.utime(mark, (finished - 600, finished - 600))
    assert _by_task(client.get("/metrics").content.decode(), AGE)["staging_sweep"] >= fresh + 600


def test_an_archive_run_leaves_its_trace_only_when_it_ran():
    from django.db import connections

    other = connections.create_connection("default")  # another archiver, at work
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(%s)", [services.ARCHIVE_LOCK])
        assert services.usage_archive() == {"files": 0, "records": 0}
        assert not Watermark.objects.filter(name="archive").exists()
        with other.cursor() as cursor:
            # Released here, not by the close: the server ends a closed session's backend (and frees its
            # locks) after the client has gone, and the archive run below once found the lock still held.
            cursor.execute("SELECT pg_advisory_unlock(%s)", [services.ARCHIVE_LOCK])
    finally:
        other.close()
    services.usage_archive()
    assert Watermark.objects.filter(name="archive").exists()


def test_the_scrape_answers_without_ages_when_postgres_is_away():
    services.usage_rollup()
    from django.db import connection as db

    proxy = TcpProxy(int(db.settings_dict["PORT"] or 5432), db.settings_dict["HOST"] or "127.0.0.1")
    try:
        with api_server(API_WORKERS="1", DATABASE_URL=database_url_for_tests(port=proxy.port)) as base:
            page = httpx.get(f"{base}/metrics", timeout=10)
            # (The staging sweep's age comes from the store, not Postgres: left out here.)
            assert page.status_code == 200 and _by_task(page.text, AGE).keys() - {"staging_sweep"} == {"usage_rollup"}
            proxy.cut()
            page = httpx.get(f"{base}/metrics", timeout=10)  # it answers (the connect is bounded too: 2 s)
            assert page.status_code == 200, page.text[:500]
            assert _by_task(page.text, AGE).keys() - {"staging_sweep"} == set()
            assert _by_task(page.text, INTERVAL)["usage_rollup"] == 60.0
            assert "resizer_resize_requests_total" in page.text  # the rest of the page is there
            proxy.restore()
            deadline = time.monotonic() + 15
            while "usage_rollup" not in _by_task(httpx.get(f"{base}/metrics", timeout=10).text, AGE):
                assert time.monotonic() < deadline, "ages did not come back with Postgres"
                time.sleep(0.5)
    finally:
        proxy.close()


def test_periods_billing_cannot_finalize_are_counted(client):
    """Billing finalizes each period on its own (one that cannot be priced stays in grace, logged), so
    billing itself stays fresh: a period never invoiced showed nowhere but a log line (found by review)."""
    from datetime import date

    from identity.services import customer_create
    from metering.models import BillingPeriod

    def overdue() -> float:
        page = client.get("/metrics").content.decode()
        return [s.value for f in text_string_to_metric_families(page) for s in f.samples
                if s.name == "resizer_billing_periods_overdue"][0]

    assert overdue() == 0
    customer = customer_create(name="overdue")
    today = date.today()
    BillingPeriod.objects.create(customer=customer, start=today - timedelta(days=40), end=today - timedelta(days=3),
                                 status=BillingPeriod.Status.GRACE)  # its grace (3 days) ends today: not yet
    assert overdue() == 0
    BillingPeriod.objects.create(customer=customer, start=today - timedelta(days=80), end=today - timedelta(days=40),
                                 status=BillingPeriod.Status.GRACE)
    assert overdue() == 1
