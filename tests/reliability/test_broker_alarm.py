"""A RabbitMQ resource alarm (memory or disk), on a broker node of the test's own: the node stops reading
from every connection that publishes. Before 2026-11-23 every resize request then hung for as long as the
alarm lasted (its thread and its customer's slots held; /readyz said `broker: ok`), and every worker froze
in the publish of Celery's event heartbeat, its queue at 0 consumers.

Now a job is refused at once (503 `queue_unavailable`), /readyz says the publishes are blocked, a worker
keeps running what waits in the queue, and the first publish after the alarm is accepted again."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from identity.models import Plan
from identity.services import api_key_create, customer_create
from scripts.topology import Topology
from tests.conftest import make_image
from tests.processes import api_server, database_url_for_tests, own_worker, wait_authenticated

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# A deadline for a request, not a measurement: far above the 5 s publish bound, far below the alarm.
PATIENCE_SECONDS = 20


@pytest.fixture
def broker():
    """One RabbitMQ node of the test's own (an alarm on the machine's broker would block every other test)."""
    t = Topology(database_url=database_url_for_tests(), rabbit_nodes_count=1, prometheus=False)
    t._rabbit_prepare()
    t.start_rabbit_node(0)
    try:
        yield t
    finally:
        t.stop()


def _alarm(broker: Topology, on: bool) -> None:
    broker.rabbitmqctl(0, "set_vm_memory_high_watermark", "0.0000001" if on else "0.4")
    deadline = time.monotonic() + 30
    while ("memory" in broker.rabbitmqctl(0, "eval", "rabbit_alarm:get_alarms().")) != on:
        assert time.monotonic() < deadline, f"the memory alarm did not {'start' if on else 'clear'}"
        time.sleep(0.2)


def _at_once(n: int, request):  # type: ignore[no-untyped-def]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: request(), range(n)))


def test_a_resource_alarm_refuses_jobs_at_once_and_workers_keep_running_the_queue(broker):
    plan, _ = Plan.objects.get_or_create(name="reliability-unlimited", defaults={"rate_per_second": 10_000,
                                                                               "burst": 10_000})
    _, key = api_key_create(customer=customer_create(name=f"alarm-{uuid.uuid4().hex[:6]}", plan=plan))
    url, queue = broker.rabbit_nodes[0].url, f"test.alarm.{uuid.uuid4().hex[:8]}"
    image = make_image("PNG", (64, 48))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "image/png"}
    # One process: /readyz is answered by the process whose publishes were refused.
    with api_server(BROKER_URL=url, RESIZE_QUEUE=queue, API_WORKERS="1") as base, \
            httpx.Client(base_url=base, timeout=PATIENCE_SECONDS, headers=headers) as http:
        wait_authenticated(base, key)
        # Jobs published at once before the alarm, with no worker yet: the process's pool holds several
        # connections that have published, so the broker blocks each, and notifies it, as the alarm starts.
        queued = _at_once(6, lambda: http.post("/v1/resize?width=16", content=image,
                                               headers={"Prefer": "respond-async"}))
        assert [r.status_code for r in queued] == [202] * 6, [r.text for r in queued]
        _alarm(broker, on=True)
        try:
            refused = [http.post("/v1/resize?width=16", content=image, headers=asks)
                       for asks in ({"Prefer": "respond-async"}, {}, {"Prefer": "respond-async"}, {})]
            print(f"\nbroker alarm: refusals answered in {[round(r.elapsed.total_seconds() * 1000) for r in refused]} ms")
            assert [(r.status_code, r.json()["code"], r.headers["Retry-After"]) for r in refused] == [
                (503, "queue_unavailable", "2")] * 4
            readyz = httpx.get(f"{base}/readyz", timeout=PATIENCE_SECONDS)
            assert readyz.status_code == 200
            assert readyz.json()["checks"]["broker"].startswith("degraded: publishing blocked by a resource alarm")
            # A worker started during the alarm runs what waits in the queue (Celery's event heartbeat
            # froze its main thread before it consumed anything).
            with own_worker("alarm", BROKER_URL=url, RESIZE_QUEUE=queue):
                started, deadline = time.monotonic(), time.monotonic() + 60
                for job in (r.json()["id"] for r in queued):
                    while (state := http.get(f"/v1/jobs/{job}").json())["status"] != "succeeded":
                        assert time.monotonic() < deadline, state
                        time.sleep(0.2)
                print(f"broker alarm: the 6 queued jobs done {time.monotonic() - started:.1f} s after the worker was ready")
        finally:
            _alarm(broker, on=False)
        # After the alarm, jobs are accepted, at once and together (a pooled connection that sat idle
        # through the alarm and reads its `blocked` at its next publish tries again on a connection of
        # its own: resizer.services._send).
        accepted = _at_once(6, lambda: http.post("/v1/resize?width=16", content=image,
                                                 headers={"Prefer": "respond-async"}))
        assert [r.status_code for r in accepted] == [202] * 6, [r.text for r in accepted]
