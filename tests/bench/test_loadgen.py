"""The benchmark's load generator counts what it is answered, and behaves as the clients it models."""
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from bench import loadgen
from scripts.topology import free_port


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """/ok answers 200; /busy answers 503 with Retry-After: 1 (as admission control does)."""
    port = free_port()
    app = web.Application()
    app.router.add_route("*", "/ok", _ok)
    app.router.add_route("*", "/busy", _busy)
    app.router.add_route("*", "/once-busy", _once_busy)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=1)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
        started.set()
        loop.run_forever()

    threading.Thread(target=serve, daemon=True).start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}"
    # Closed before the loop stops: a handler task left pending was logged at the interpreter's exit
    # ("Task was destroyed but it is pending!").
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)


async def _ok(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"x")


async def _busy(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=503, headers={"Retry-After": "1"})


_once_busy_seen: set[str] = set()


async def _once_busy(request: web.Request) -> web.Response:
    """503 with Retry-After: 1 the first time an image (its ?i=) is asked for, then 200."""
    image = request.query["i"]
    if image not in _once_busy_seen:
        _once_busy_seen.add(image)
        return web.Response(status=503, headers={"Retry-After": "1"})
    return web.Response(body=b"x")


def test_percentile_is_the_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50
    assert loadgen.percentile(values, 99) == 99
    assert loadgen.percentile(values, 99.9) == 100
    assert loadgen.percentile([3.0], 99) == 3
    assert math.isnan(loadgen.percentile([], 50))


def test_closed_loop_counts_every_answer_and_keeps_latencies_of_the_200s_by_input(server):
    labels = ["a.jpg", "b.jpg"]
    result = asyncio.run(loadgen.closed_loop(
        lambda i: loadgen.Request("POST", f"{server}/ok", labels[i % 2], b"body"), concurrency=3, seconds=0.5,
        warmup=0.1))
    assert result.ok > 0 and set(result.statuses) == {200}
    assert len(result.latencies) == result.ok == sum(len(v) for v in result.by_label.values())
    assert set(result.by_label) == set(labels)
    assert result.throughput == result.ok / 0.5
    assert all(latency > 0 for latency in result.latencies)


def test_a_client_honoring_retry_after_waits_and_one_that_does_not_asks_again_at_once(server):
    busy = lambda i: loadgen.Request("GET", f"{server}/busy", "x")  # noqa: E731
    polite = asyncio.run(loadgen.closed_loop(busy, concurrency=2, seconds=0.6, warmup=0))
    storm = asyncio.run(loadgen.closed_loop(busy, concurrency=2, seconds=0.6, warmup=0, honor_retry_after=False))
    # Retry-After (1 s) is longer than the window: each polite client asks once.
    assert polite.statuses == {503: 2} and polite.ok == 0 and polite.latencies == []
    assert storm.statuses[503] > 2 * polite.statuses[503]  # more than once a client: Retry-After ignored


def test_open_loop_sends_on_schedule_whatever_the_answers_and_counts_errors(server):
    result = asyncio.run(loadgen.open_loop(lambda i: loadgen.Request("GET", f"{server}/ok", "x"), rate=40,
                                           seconds=0.5, warmup=0.1))
    assert result.ok > 0 and set(result.statuses) == {200}
    gone = asyncio.run(loadgen.open_loop(lambda i: loadgen.Request("GET", f"http://127.0.0.1:{free_port()}/", "x"),
                                         rate=40, seconds=0.3, warmup=0))
    assert gone.ok == 0 and sum(gone.statuses.values()) > 0
    assert all(isinstance(k, str) for k in gone.statuses)  # the exception's name, not a status


def test_a_refused_image_is_asked_for_again_and_its_latency_includes_the_wait(server):
    """Latency was per attempt: a client refused and told to wait 1 s recorded only its last, fast
    attempt, so a service that sheds looked faster than one that queues."""
    result = asyncio.run(loadgen.closed_loop(
        lambda i: loadgen.Request("GET", f"{server}/once-busy?i=img{i}", "x"), concurrency=1, seconds=2.5, warmup=0))
    assert result.statuses[503] >= 1 and result.ok >= 1
    # The same image again after the wait (not the next one), and its latency counts from the first try.
    assert all(latency >= 1.0 for latency in result.latencies), result.latencies
    assert sum(result.total.values()) >= result.answered and result.elapsed >= 2.5
