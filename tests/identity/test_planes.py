"""The two planes across real processes: writes through the management API on one server reach a
separately started server (the seconds it took are printed against the published 5 s bound; the
test waits up to three times that); authentication (and resizing) go on with Postgres cut off;
rate limits hold across servers."""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from identity.models import Plan
from identity.services import api_key_create, customer_create
from tests.conftest import corpus
from tests.processes import TcpProxy, api_server, database_url_for_tests

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PROPAGATION_BOUND_SECONDS = 5.0
NO_JOB = "/v1/jobs/" + "0" * 32  # 404 when authenticated, 401/403 when not: a probe of the data plane


STREAK = 30  # answers in a row, each on a new connection: enough to reach both gunicorn processes


def _until_stable(http: httpx.Client, key: str, expected: int, bound: float) -> float:
    """Seconds until `expected` is answered STREAK times in a row (every API process agrees); fails
    past three times `bound`. Each probe on a new connection: on one kept alive, every probe reached
    the same gunicorn process, and the other one's answer was never sampled."""
    started = time.monotonic()
    streak_start, streak = None, 0
    while time.monotonic() - started < bound * 3:
        status = http.get(NO_JOB, headers={"Authorization": f"Bearer {key}", "Connection": "close"}).status_code
        if status == expected:
            streak_start = streak_start or time.monotonic()
            streak += 1
            if streak >= STREAK:
                return streak_start - started
        else:
            streak_start, streak = None, 0
        time.sleep(0.02)
    raise AssertionError(f"never answered {expected} steadily within {bound * 3} s (last: {status})")


def _snapshot(tmp_path, name: str) -> str:
    return str(tmp_path / f"{name}-snapshot.json")


def test_new_revoked_and_suspended_reach_every_process_of_another_server(tmp_path):
    """Each change reaches both processes of another server (within three times the published 5 s
    bound, the deadline; the seconds measured are printed, and the bound itself is a benchmark's
    number, not a test's pass/fail on a loaded 2-core machine: docs/adr/0003)."""
    admin = customer_create(name="ops-automation")
    _, admin_key = api_key_create(customer=admin, scopes=["admin"])
    with api_server(AUTH_SNAPSHOT_PATH=_snapshot(tmp_path, "a")) as a, \
            api_server(AUTH_SNAPSHOT_PATH=_snapshot(tmp_path, "b")) as b, \
            httpx.Client(base_url=a, timeout=30, headers={"Authorization": f"Bearer {admin_key}"}) as on_a, \
            httpx.Client(base_url=b, timeout=30) as on_b:
        deadline = time.monotonic() + 3 * PROPAGATION_BOUND_SECONDS
        while on_a.get("/v1/admin/customers").status_code != 200:  # the admin key is in A's snapshot
            assert time.monotonic() < deadline
            time.sleep(0.05)
        created = on_a.post("/v1/admin/customers", json={"name": f"new-{uuid.uuid4().hex[:6]}"})
        assert created.status_code == 201, created.text
        customer_id = created.json()["id"]
        issued = on_a.post(f"/v1/admin/customers/{customer_id}/keys", json={"name": "web"}).json()
        key = issued["key"]
        new_key_seconds = _until_stable(on_b, key, 404, PROPAGATION_BOUND_SECONDS)

        assert on_a.delete(f"/v1/admin/keys/{issued['id']}").json()["revoked_at"]
        revoked_seconds = _until_stable(on_b, key, 401, PROPAGATION_BOUND_SECONDS)

        second = on_a.post(f"/v1/admin/customers/{customer_id}/keys", json={}).json()["key"]
        _until_stable(on_b, second, 404, PROPAGATION_BOUND_SECONDS)
        assert on_a.patch(f"/v1/admin/customers/{customer_id}", json={"status": "suspended"}).status_code == 200
        suspended_seconds = _until_stable(on_b, second, 403, PROPAGATION_BOUND_SECONDS)

        audit = on_a.get(f"/v1/admin/customers/{customer_id}/audit").json()["events"]
        assert [e["action"] for e in audit][:4] == ["customer.suspend", "key.issue", "key.revoke", "key.issue"]
        assert {e["actor"] for e in audit} == {f"key:{admin_key.split('_')[1]}"}
    # Measured, not asserted (timings are not pass/fail in tests): _until_stable failed the test had
    # any change not reached the other server within its deadline.
    print(f"\npropagation to another server: new key {new_key_seconds:.2f} s, revoked {revoked_seconds:.2f} s, "
          f"suspended {suspended_seconds:.2f} s (bound {PROPAGATION_BOUND_SECONDS} s)")


@pytest.mark.usefixtures("worker")
def test_authentication_and_resizing_go_on_with_postgres_cut_off(tmp_path):
    from django.db import connection

    customer = customer_create(name="outage")
    _, key = api_key_create(customer=customer)
    proxy = TcpProxy(int(connection.settings_dict["PORT"] or 5432))
    snapshot = _snapshot(tmp_path, "c")
    via_proxy = database_url_for_tests(port=proxy.port)
    try:
        with api_server(DATABASE_URL=via_proxy, AUTH_SNAPSHOT_PATH=snapshot) as c, \
                httpx.Client(base_url=c, timeout=30, headers={"Authorization": f"Bearer {key}"}) as http:
            _until_stable(http, key, 404, PROPAGATION_BOUND_SECONDS)
            proxy.cut()
            for _ in range(20):  # several seconds without Postgres: every request authenticated
                assert http.get(NO_JOB).status_code == 404
                time.sleep(0.1)
            resized = http.post("/v1/resize?width=64", content=corpus("coffee.jpg"))
            assert resized.status_code == 200 and resized.headers["content-type"] == "image/jpeg"
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["database"].startswith("degraded")
            # A process started during the outage serves from the snapshot its peers left on disk.
            with api_server(DATABASE_URL=via_proxy, AUTH_SNAPSHOT_PATH=snapshot) as d:
                assert httpx.get(f"{d}{NO_JOB}", headers={"Authorization": f"Bearer {key}"},
                                 timeout=30).status_code == 404
            proxy.restore()
            deadline = time.monotonic() + 15
            while http.get("/readyz").json().get("status") != "ready":
                assert time.monotonic() < deadline, "did not recover after Postgres came back"
                time.sleep(0.2)
    finally:
        proxy.close()


def test_rate_limit_holds_across_two_servers(tmp_path):
    # A burst above every process's floor of 4 tokens (dataplane.LOCAL_BURST_FLOOR), so the share shows.
    plan = Plan.objects.create(name=f"tight-{uuid.uuid4().hex[:6]}", rate_per_second=2, burst=20)
    customer = customer_create(name="flooder", plan=plan)
    _, key = api_key_create(customer=customer)
    with api_server(AUTH_SNAPSHOT_PATH=_snapshot(tmp_path, "e")) as e, \
            api_server(AUTH_SNAPSHOT_PATH=_snapshot(tmp_path, "f")) as f:
        clients = [httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}"})
                   for base in (e, f)]
        # A process starts its credential cache (and its heartbeat) on first use: wake every process
        # (readyz uses it; a new connection each, to reach both of a server's), then let each count
        # its peers. Before, some counted 2 of the 4, each holding half the burst instead of a quarter.
        for base in (e, f):
            for _ in range(20):
                httpx.get(f"{base}/readyz", headers={"Connection": "close"}, timeout=30)
        time.sleep(3)
        statuses, limited = [], []
        started = time.monotonic()
        for i in range(120):
            response = clients[i % 2].get(NO_JOB)
            statuses.append(response.status_code)
            if response.status_code == 429:
                limited.append(response)
        elapsed = time.monotonic() - started
        for client in clients:
            client.close()
    admitted = statuses.count(404)
    # Two servers x two processes: without a shared limit each would admit its own burst of 20 (80).
    allowed = plan.burst + plan.rate_per_second * elapsed + 4  # + one token of rounding per process
    print(f"\nrate limit across 2 servers: {admitted} of 120 admitted in {elapsed:.2f} s (limit {allowed:.1f})")
    assert 0 < admitted <= allowed
    assert limited and all(r.json()["code"] == "rate_limited" and int(r.headers["retry-after"]) >= 1 for r in limited)


def test_a_stopping_server_flushes_its_last_quota_counts_and_leaves_the_process_count(tmp_path):
    """A process flushed its quota counts once a round (a second): whatever it admitted after its
    last round was lost when it stopped (a deploy, a restart), and its heartbeat kept counting it in
    every customer's rate share for AUTH_PROCESS_EXPIRY_SECONDS. Rounds here are a minute apart, so
    only the flush at exit can bring the counts in."""
    from identity.dataplane import _month
    from identity.models import ApiProcess, QuotaUsage
    from tests.processes import delete_queues

    plan = Plan.objects.create(name=f"quota-exit-{uuid.uuid4().hex[:6]}", rate_per_second=1000, burst=1000,
                               monthly_quota=1000)
    customer = customer_create(name="exit-flush", plan=plan)
    _, key = api_key_create(customer=customer)
    queue = f"test.exit-flush.{uuid.uuid4().hex[:8]}"
    before = set(ApiProcess.objects.values_list("name", flat=True))
    accepted = 0
    try:
        with api_server(API_WORKERS="1", RESIZE_QUEUE=queue, AUTH_POLL_SECONDS="60",
                        AUTH_SNAPSHOT_PATH=_snapshot(tmp_path, "exit")) as base, \
                httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {key}",
                                                                 "Prefer": "respond-async"}) as http:
            for _ in range(5):
                accepted += http.post("/v1/resize?width=50", content=corpus("coffee.jpg")).status_code == 202
            assert accepted == 5
            assert set(ApiProcess.objects.values_list("name", flat=True)) - before  # its heartbeat
        # api_server's exit: TERM, and wait for gunicorn to stop
    finally:
        delete_queues(queue)
    assert QuotaUsage.objects.get(customer=customer, month=_month()).used == accepted
    assert set(ApiProcess.objects.values_list("name", flat=True)) <= before
