"""The data plane's staleness bound (AUTH_MAX_STALENESS_SECONDS): a snapshot that has not synced for
longer (Postgres away that long) is not trusted. Every key, known or not, is then 503
`auth_unavailable` with Retry-After: neither served from old credentials nor refused as invalid.
The snapshot is aged by moving its sync time back, not by waiting."""
from __future__ import annotations

import time

import pytest

from identity.dataplane import AuthUnavailable
from identity.keys import key_generate

pytestmark = pytest.mark.django_db

NO_JOB = "/v1/jobs/" + "0" * 32  # 404 when authenticated


def _age(cache, seconds: float) -> None:
    """As if the cache's last successful sync was `seconds` ago."""
    cache.synced_at = time.time() - seconds


def test_a_key_is_served_within_the_staleness_bound_and_refused_past_it(credentials, customer_key):
    customer, key = customer_key
    bound = credentials.max_staleness_seconds
    assert credentials.authenticate(key).customer_id == str(customer.id)
    _age(credentials, bound * 0.9)  # old, still inside the bound
    assert credentials.authenticate(key).customer_id == str(customer.id)
    _age(credentials, bound + 1)
    with pytest.raises(AuthUnavailable):
        credentials.authenticate(key)
    with pytest.raises(AuthUnavailable):  # nor is a key it never knew called invalid: it cannot tell
        credentials.authenticate(key_generate()[1])
    credentials.sync(full=False)  # Postgres answers again: the snapshot is fresh, the key served
    assert credentials.authenticate(key).customer_id == str(customer.id)


def test_past_the_bound_the_api_answers_503_auth_unavailable_with_retry_after(api, credentials):
    assert api.get(NO_JOB).status_code == 404
    _age(credentials, credentials.max_staleness_seconds + 1)
    for response in (api.get(NO_JOB), api.post("/v1/resize?width=10", data=b"\xff\xd8",
                                               content_type="image/jpeg")):
        assert response.status_code == 503 and response["Content-Type"] == "application/problem+json"
        body = response.json()
        assert body["code"] == "auth_unavailable" and body["status"] == 503 and body["detail"]
        assert response["Retry-After"] == "5"  # what identity.authentication answers
