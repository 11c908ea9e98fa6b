"""Per-customer rate limits and monthly quotas, answered from the data plane (429 + Retry-After)."""
from __future__ import annotations

import pytest

from identity.models import Plan
from identity.services import api_key_create, customer_create
from tests.conftest import make_image

pytestmark = pytest.mark.django_db


def _client_for(client, credentials, **plan):
    customer = customer_create(name="limited", plan=Plan.objects.create(name="p", **plan))
    _, key = api_key_create(customer=customer)
    credentials.sync(full=True)
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client


def test_rate_limit_allows_the_burst_then_429(client, credentials):
    api = _client_for(client, credentials, rate_per_second=0.5, burst=3)
    statuses = [api.get("/v1/jobs/" + "0" * 32).status_code for _ in range(5)]
    assert statuses == [404, 404, 404, 429, 429]
    limited = api.get("/v1/jobs/" + "0" * 32)
    assert limited.json()["code"] == "rate_limited" and int(limited["Retry-After"]) >= 1


def test_one_customer_flooding_does_not_limit_another(client, credentials):
    flooder = customer_create(name="flooder", plan=Plan.objects.create(name="tiny", rate_per_second=0.1, burst=1))
    _, flood_key = api_key_create(customer=flooder)
    _, calm_key = api_key_create(customer=customer_create(name="calm"))
    credentials.sync(full=True)
    for _ in range(5):
        client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {flood_key}")
    assert client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {flood_key}").status_code == 429
    assert client.get("/v1/jobs/" + "0" * 32, HTTP_AUTHORIZATION=f"Bearer {calm_key}").status_code == 404


def test_monthly_quota_counts_images_and_refuses_past_it(client, credentials):
    api = _client_for(client, credentials, rate_per_second=100, burst=100, monthly_quota=2)
    send = lambda: api.post("/v1/resize?width=8", data=make_image(), content_type="image/jpeg",  # noqa: E731
                            HTTP_PREFER="respond-async")
    bad = api.post("/v1/resize?width=0", data=make_image(), content_type="image/jpeg")
    assert bad.status_code == 400  # a refused request costs no quota
    assert [send().status_code for _ in range(2)] == [202, 202]
    over = send()
    assert over.status_code == 429 and over.json()["code"] == "quota_exceeded"
    assert int(over["Retry-After"]) > 0
    credentials.sync(full=False)  # flushed to Postgres and read back: still over
    assert send().status_code == 429


def test_a_replay_of_a_paid_job_is_answered_after_the_quota_ran_out(client, credentials):
    """The last image of the quota was made, but its answer was lost: the client's retry with the same
    Idempotency-Key gets that job (it was paid for), not 429 until next month. A new request, or a
    different one under the same key, is still refused or rejected."""
    api = _client_for(client, credentials, rate_per_second=100, burst=100, monthly_quota=1)
    image = make_image()
    send = lambda key, width=8: api.post(f"/v1/resize?width={width}", data=image,  # noqa: E731
                                         content_type="image/jpeg", HTTP_PREFER="respond-async",
                                         HTTP_IDEMPOTENCY_KEY=key)
    first = send("K")
    assert first.status_code == 202
    replay = send("K")
    assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
    assert send("other").json()["code"] == "quota_exceeded"
    assert send("K", width=9).json()["code"] == "idempotency_key_reused"
    credentials.sync(full=False)
    from identity.dataplane import _month
    from identity.models import QuotaUsage

    assert QuotaUsage.objects.get(month=_month()).used == 1  # the replay cost nothing


def test_refunds_and_deleted_customers_never_break_the_flush(credentials):
    """A refund (the queue refused the job) can leave a negative count to flush: after its charge
    was flushed, or with no row yet this month. A customer can be deleted with counts pending. None
    of these may fail the flush (it would fail every second, and the snapshot would age into 503s)."""
    from identity.dataplane import _month
    from identity.models import QuotaUsage

    plan = Plan.objects.create(name="q", rate_per_second=100, burst=100, monthly_quota=10)
    kept, gone, fresh = (customer_create(name=n, plan=plan) for n in ("kept", "gone", "fresh"))
    keys = {c.name: api_key_create(customer=c)[1] for c in (kept, gone, fresh)}
    credentials.sync(full=True)
    principals = {name: credentials.authenticate(key) for name, key in keys.items()}
    assert credentials.charge_quota(principals["kept"])
    credentials.sync(full=False)  # +1 flushed
    credentials.refund_quota(principals["kept"])  # -1 pending, its charge already in Postgres
    credentials.refund_quota(principals["fresh"])  # -1 pending, no row this month
    assert credentials.charge_quota(principals["gone"])
    gone.delete()  # +1 pending for a customer that no longer exists
    synced_before = credentials.synced_at
    credentials.sync(full=False)
    assert credentials.synced_at > synced_before
    used = dict(QuotaUsage.objects.filter(month=_month()).values_list("customer__name", "used"))
    assert used == {"kept": 0}
    assert credentials.charge_quota(principals["kept"])  # the counts are right, not stuck
    credentials.sync(full=False)
    assert QuotaUsage.objects.get(customer=kept, month=_month()).used == 1


def test_a_quota_that_cannot_be_confirmed_is_a_short_retry_not_next_month(client, credentials):
    """With stale totals a process admits only its share of what is left; past it the answer was the
    same 429 quota_exceeded with Retry-After until next month, though the rest may be there."""
    api = _client_for(client, credentials, rate_per_second=100, burst=100, monthly_quota=4)
    credentials.processes = 4  # its share of the 4 left: 1
    credentials._quota_read_at = float("-inf")  # the totals cannot be read (Postgres away)
    send = lambda: api.post("/v1/resize?width=8", data=make_image(), content_type="image/jpeg",  # noqa: E731
                            HTTP_PREFER="respond-async")
    assert send().status_code == 202
    unconfirmed = send()
    assert unconfirmed.status_code == 503 and unconfirmed.json()["code"] == "quota_unconfirmed"
    assert unconfirmed["Retry-After"] == "5"
