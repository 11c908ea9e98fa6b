"""GET /v1/usage: a customer's own rollups per hour or day, JSON; bad parameters are 400 problems."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest

from metering import services
from tests.metering.conftest import insert, usage

pytestmark = pytest.mark.django_db

T0 = (datetime.now(timezone.utc) - timedelta(days=2)).replace(hour=10, minute=0, second=0, microsecond=0)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@pytest.fixture
def usage_of_two_customers(customer_key):
    mine = customer_key[0].id
    insert(usage(mine, at=T0 + timedelta(minutes=5)), usage(mine, at=T0 + timedelta(minutes=50)),
           usage(mine, at=T0 + timedelta(hours=2)), usage(mine, at=T0 + timedelta(minutes=6), outcome="failed"),
           usage(uuid.uuid4(), at=T0 + timedelta(minutes=5)))
    services.usage_rollup()


def test_hourly_and_daily_windows_of_my_own_usage(api, usage_of_two_customers):
    hourly = api.get(f"/v1/usage?granularity=HOUR&from={iso(T0)}&to={iso(T0 + timedelta(hours=3))}")  # any case
    assert hourly.status_code == 200, hourly.content
    body = hourly.json()
    assert [w["start"] for w in body["windows"]] == [iso(T0), iso(T0 + timedelta(hours=2))]
    first = body["windows"][0]
    assert (first["images"], first["failed_images"], first["input_bytes"]) == (2, 1, 500_000)
    assert first["output_megapixels"] == pytest.approx(0.04) and first["cpu_seconds"] == pytest.approx(0.014)
    assert body["totals"]["images"] == 3 and body["as_of"]
    assert hourly["Cache-Control"] == "private, no-store"

    daily = api.get(f"/v1/usage?granularity=day&from={T0.date()}&to={T0.date() + timedelta(days=1)}").json()
    assert [(w["start"], w["images"]) for w in daily["windows"]] == [(iso(T0.replace(hour=0)), 3)]
    # Defaults: daily windows of the last 30 days.
    assert api.get("/v1/usage").json()["totals"]["images"] == 3


def test_another_customers_usage_is_not_visible(client, credentials, usage_of_two_customers):
    from identity.services import api_key_create, customer_create

    _, key = api_key_create(customer=customer_create(name="other"))
    credentials.sync(full=True)
    body = client.get("/v1/usage", HTTP_AUTHORIZATION=f"Bearer {key}").json()
    assert body["windows"] == [] and body["totals"]["images"] == 0


@pytest.mark.parametrize("query,code", [
    ("granularity=minute", "invalid_parameter"),
    ("from=yesterday", "invalid_parameter"),
    ("to=0001-01-01", "invalid_parameter"),  # to minus the default range is before year 1
    ("from=0001-01-01T00:30:00%2B01:00", "invalid_parameter"),  # before year 1 in UTC
    ("to=9999-12-31T23:30:00-01:00", "invalid_parameter"),  # after year 9999 in UTC
    ("from=2026-11-02&to=2026-11-01", "invalid_parameter"),
    ("granularity=hour&from=2026-01-01&to=2026-03-01", "range_too_large"),
    ("from=2020-01-01&to=2026-01-01", "range_too_large"),
    ("customer=someone-else", "unknown_parameter"),
    ("from=garbage&from=2026-11-01", "invalid_parameter"),  # repeated: it was read as its last value
    ("granularity=day&granularity=day", "invalid_parameter"),
])
def test_bad_parameters_are_400_problems(api, query, code):
    response = api.get(f"/v1/usage?{query}")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == code and response.json()["detail"]
    if code == "range_too_large":
        assert ("hourly" if "granularity=hour" in query else "daily") in response.json()["detail"]


def test_an_offset_whose_plus_was_not_encoded_is_told_so(api):
    """`+01:00` sent as it is in the query arrives as ` 01:00`: the sentence said only "ISO 8601"."""
    response = api.get("/v1/usage?from=2026-11-01T13:00:00+01:00")
    assert response.status_code == 400 and response.json()["parameter"] == "from"
    assert "%2B" in response.json()["detail"]
    assert api.get("/v1/usage?from=2026-11-01T13:00:00%2B01:00").status_code == 200


def test_usage_needs_a_key_with_the_usage_scope(client, credentials):
    from identity.services import api_key_create, customer_create

    assert client.get("/v1/usage").status_code == 401
    _, key = api_key_create(customer=customer_create(name="resize-only"), scopes=["resize"])
    credentials.sync(full=True)
    response = client.get("/v1/usage", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 403 and response.json()["code"] == "insufficient_scope"
