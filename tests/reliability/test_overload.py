"""Behaviour under overload, end to end over HTTP (gunicorn, the real broker, a real worker): one
customer's flood is refused early with 429 while another customer is served as usual; an
asynchronous flood is refused before it fills the queue for everyone; past the queue bound every
new resize is 503 `queue_full` at once, and nothing waits without bound."""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from identity.models import Plan
from identity.services import api_key_create, customer_create
from tests.conftest import corpus
from tests.processes import api_server, delete_queues, wait_authenticated
from tests.reliability.load import Load, summary

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def _key(name: str) -> str:
    """A customer on a plan generous enough that only admission control refuses it."""
    plan, _ = Plan.objects.get_or_create(name="reliability-unlimited", defaults={"rate_per_second": 10_000,
                                                                               "burst": 10_000})
    _, key = api_key_create(customer=customer_create(name=f"{name}-{uuid.uuid4().hex[:6]}", plan=plan))
    return key


def test_one_customers_flood_does_not_starve_another(worker):
    flood_key, quiet_key = _key("flood"), _key("quiet")
    # One process with 6 slots: no customer may hold more than 3 of them. The in-flight limit that
    # follows the queue wait is off (target 0): under the flood jobs wait past its target, and the
    # limit falling would refuse the quiet customer too (503 queue_full); this test is about the share.
    with api_server(API_WORKERS="1", ADMISSION_MAX_IN_FLIGHT="6", ADMISSION_CUSTOMER_SHARE="0.5",
                    ADMISSION_TARGET_QUEUE_WAIT_SECONDS="0") as base:
        wait_authenticated(base, flood_key)
        wait_authenticated(base, quiet_key)
        flood = Load(base, flood_key, corpus("photo-256k-0.jpg"), threads=10, duration=8,
                     refusal_pause=0.02).start()
        time.sleep(1)  # the flood is on
        quiet = Load(base, quiet_key, corpus("photo-256k-1.jpg"), threads=1, duration=6, pause=0.1).run()
        flooded = flood.join()
    print(f"\noverload, flood: {summary(flooded)}\noverload, quiet customer: {summary(quiet)}")
    codes = {a.code for a in flooded}
    assert "ok" in codes and "customer_over_share" in codes, summary(flooded)
    assert all(a.clear_error for a in flooded if not a.accepted), summary(flooded)
    assert all(a.retry_after == "1" for a in flooded if a.status == 429)
    # The other customer: every request served (its latency is printed above; timings are not
    # asserted in tests, the SLO under overload is measured by bench/bench_peers.py).
    assert quiet and all(a.status == 200 for a in quiet), summary(quiet)
    # The flood's refusals came from admission (its share), not from a wait that ran out.
    assert {a.code for a in flooded if a.status == 429} == {"customer_over_share"}, summary(flooded)


def test_an_async_flood_is_refused_before_the_queue_is_full_for_everyone():
    """A queue no worker consumes, so every accepted job stays in it: the depth only grows."""
    flood_key, quiet_key = _key("flood"), _key("quiet")
    queue = f"test.overload.{uuid.uuid4().hex[:8]}"
    image = corpus("coffee.jpg")
    try:
        with api_server(API_WORKERS="1", RESIZE_QUEUE=queue, ADMISSION_MAX_QUEUE_DEPTH="20",
                        ADMISSION_QUEUE_PROBE_SECONDS="0.1") as base:
            wait_authenticated(base, flood_key)
            wait_authenticated(base, quiet_key)
            async_headers = {"Prefer": "respond-async"}
            with httpx.Client(base_url=base, timeout=30, headers=async_headers) as http:
                def post(key: str) -> httpx.Response:
                    return http.post("/v1/resize?width=50", content=image,
                                     headers={"Authorization": f"Bearer {key}"})

                def depth_at_least(n: int) -> None:
                    deadline = time.monotonic() + 5
                    while _ready(base, queue) < n:
                        assert time.monotonic() < deadline, _ready(base, queue)
                        time.sleep(0.05)

                # Both customers send; the flood sends far more. Below half the bound, all are accepted.
                answers = [post(flood_key).status_code for _ in range(9)] + [post(quiet_key).status_code]
                assert answers == [202] * 10
                depth_at_least(10)
                time.sleep(0.3)  # the probe's next reading
                flood_past_half = post(flood_key)
                assert flood_past_half.status_code == 429 and flood_past_half.json()["code"] == "customer_over_share"
                assert flood_past_half.headers["retry-after"] == "1"
                # ...while the quiet customer is still accepted.
                assert [post(quiet_key).status_code for _ in range(5)] == [202] * 5
                # With no one else sending (the last second's admissions are the flood's alone), the
                # flood may fill the queue up to the bound itself; there everyone is refused.
                time.sleep(2.1)
                assert [post(flood_key).status_code for _ in range(5)] == [202] * 5
                depth_at_least(20)
                time.sleep(0.3)
                for key in (quiet_key, flood_key):
                    full = post(key)
                    assert full.status_code == 503 and full.json()["code"] == "queue_full", full.text
                    assert full.headers["retry-after"]
    finally:
        delete_queues(queue)


def _ready(base: str, queue: str) -> int:
    """The queue's depth as the server's /metrics reports it (the same probe admission reads)."""
    from tests.observability.test_metrics import scrape, value

    return int(value(scrape(f"{base}/metrics"), "resizer_queue_messages_ready", queue=queue) or 0)


@pytest.mark.chaos
def test_admission_control_keeps_the_queue_short_when_offered_more_than_the_workers_drain():
    """The same overload twice: 4 customers × 4 clients sending SLO-class images (a 0.9 MB photo to
    1280 px, ~70 ms of a worker's CPU) to one API process in front of one worker process, which drains
    ~11 a second here; refused clients retry after Retry-After (1 s). Without admission control every
    request is admitted and waits in the queue: up to one job per client. With it, sized as ADR 0006
    says (in flight ≈ drain rate × 0.35 s ≈ 4), the server never has more than 4 jobs out, so no more
    than 4 wait in the queue, and the excess is refused at once with a code and Retry-After.
    The latencies this buys (the admitted p99 inside the 0.5 s SLO) are timings, measured by
    bench/bench_overload.py (docs/RELIABILITY.md) and only printed here: asserted, they failed one run
    in six on this machine."""
    from tests.processes import own_worker
    from tests.reliability.load import OVERLOAD_BOUNDS, QueueDepth

    keys = [_key(f"overload{i}") for i in range(4)]
    image = corpus("photo-900k.jpg")
    runs, depths = {}, {}
    with own_worker("overload") as worker:
        for name, bounds in OVERLOAD_BOUNDS.items():
            with api_server(API_WORKERS="1", RESIZE_QUEUE=worker.queue, **bounds) as base:
                for key in keys:
                    wait_authenticated(base, key)
                with QueueDepth(worker.queue) as depth:
                    loads = [Load(base, key, image, threads=4, duration=15, query="width=1280",
                                  refusal_pause=1.0).start() for key in keys]
                    answers = [a for load in loads for a in load.join()]
            runs[name], depths[name] = answers, depth.samples
            served = sum(1 for a in answers if a.status == 200)
            print(f"\noverload, {name}: {summary(answers)}, served {served / 15:.1f}/s, "
                  f"jobs waiting in the queue: max {max(depth.samples)}, mean {sum(depth.samples) / len(depth.samples):.1f}")
    off, on = runs["without admission control"], runs["with admission control"]
    assert all(a.status in (200, 202, 429, 503) and (a.accepted or a.clear_error) for a in off + on)
    assert all(a.accepted for a in off), summary(off)
    # Without: the 16 clients' jobs pile up in the queue (one in the worker, the rest waiting).
    assert max(depths["without admission control"]) >= 8, depths
    # With: never more than the 4 the server may have out, and the excess was refused, not queued.
    assert len(depths["with admission control"]) > 100 and max(depths["with admission control"]) <= 4, depths
    assert sum(1 for a in on if a.status == 200) > 0 and any(a.status in (429, 503) for a in on), summary(on)
    assert all(a.retry_after for a in on if a.status in (429, 503)), summary(on)
