"""The publish retry policy (resizer.services._publish): a nack is retried with exponential backoff and
jitter within the publish budget; a connection failure (kombu already tried every node) is not.

The arithmetic (attempts, delays, the budget each attempt is given) is checked with a `send` and a
clock of the test's own, so it is exact and takes no time. The real path, the real `_send` against
RabbitMQ nacking every publish, is checked too (a quorum queue between leaders, the case it is for, is
in test_chaos.py: the leader kill)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from amqp.exceptions import MessageNacked
from kombu.exceptions import OperationalError

import celeryconfig
from resizer import services
from resizer.services import _publish


class FlakySend:
    """A `send` for the retry arithmetic: fails its first publishes with `error`, then accepts. Each
    call may take `takes` seconds of the test's clock."""

    def __init__(self, failures: int, error: Exception, clock: "Clock | None" = None, takes: float = 0.0) -> None:
        self.failures, self.error, self.calls = failures, error, []
        self.clock, self.takes = clock, takes

    def __call__(self, job_id: str, reply_to: str | None, timeout: float) -> None:
        self.calls.append((job_id, timeout))
        if self.clock is not None:
            self.clock.now += self.takes
        if len(self.calls) <= self.failures:
            raise self.error


class Clock:
    """_publish's clock (time.monotonic), moved only by the pauses and sends of the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class Pauses:
    """Stands in for _publish's sleep: notes each delay asked for and moves `clock` on by it (so the
    publish budget runs down between attempts as it would, in no time)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock, self.delays = clock, []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.clock is not None:
            self.clock.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(services, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


def _nack() -> OperationalError:
    try:
        raise MessageNacked()
    except MessageNacked as e:
        try:
            raise OperationalError("") from e  # how kombu reports it
        except OperationalError as wrapped:
            return wrapped


def test_a_nacked_publish_is_retried_with_growing_jittered_delays(clock):
    send, pauses = FlakySend(3, _nack(), clock, takes=0.25), Pauses(clock)
    _publish(send, "a" * 32, None, sleep=pauses)
    assert len(send.calls) == 4
    # The delays asked for: exponential, each with "equal jitter".
    assert len(pauses.delays) == 3
    base = celeryconfig.PUBLISH_RETRY_BASE_SECONDS
    for attempt, delay in enumerate(pauses.delays):
        step = base * 2**attempt
        assert step / 2 <= delay <= step, pauses.delays
    assert {job_id for job_id, _ in send.calls} == {"a" * 32}  # the same job each time: a duplicate runs once
    # One budget for all attempts: each is given what the sends and pauses before it left of it (a
    # fresh PUBLISH_TIMEOUT_SECONDS each was the bug this guards against).
    budget = celeryconfig.PUBLISH_TIMEOUT_SECONDS
    expected = [budget - sum(send.takes + d for d in pauses.delays[:attempt]) for attempt in range(4)]
    assert [t for _, t in send.calls] == pytest.approx(expected), (send.calls, pauses.delays)


def test_no_retry_when_the_pause_would_outlast_the_budget(clock):
    """A nack with the budget spent (here, by a send that took all of it) raises at once: no pause
    past the deadline, whatever PUBLISH_ATTEMPTS allows."""
    send, pauses = FlakySend(100, _nack(), clock, takes=celeryconfig.PUBLISH_TIMEOUT_SECONDS), Pauses(clock)
    with pytest.raises(OperationalError):
        _publish(send, "e" * 32, None, sleep=pauses)
    assert len(send.calls) == 1 and pauses.delays == []
    assert send.calls[0][1] == pytest.approx(celeryconfig.PUBLISH_TIMEOUT_SECONDS)


def test_nacks_past_the_attempts_raise(clock):
    send, pauses = FlakySend(100, _nack()), Pauses(clock)
    with pytest.raises(OperationalError):
        _publish(send, "b" * 32, None, sleep=pauses)
    assert len(send.calls) == celeryconfig.PUBLISH_ATTEMPTS
    assert len(pauses.delays) == celeryconfig.PUBLISH_ATTEMPTS - 1  # a pause between attempts, none after the last


def test_a_broker_that_cannot_be_reached_is_not_retried_here():
    send, pauses = FlakySend(100, OperationalError("[Errno 111] Connection refused")), Pauses()
    with pytest.raises(OperationalError):
        _publish(send, "c" * 32, None, sleep=pauses)
    assert len(send.calls) == 1 and pauses.delays == []


def test_the_real_publish_nacked_by_the_broker_is_tried_publish_attempts_times(nacking_queue, monkeypatch):
    """The real path: _publish with the real _send (counted by a wrapper that calls through) against
    the real broker nacking every publish. Each nack is retried after a pause, up to PUBLISH_ATTEMPTS
    sends, and the last nack is what the caller gets (job_submit turns it into 503 queue_unavailable)."""
    monkeypatch.setattr(celeryconfig, "PUBLISH_ATTEMPTS", 2)
    sends: list[tuple[str, str | None, float]] = []

    def counted_send(job_id: str, reply_to: str | None, timeout: float) -> None:
        sends.append((job_id, reply_to, timeout))
        services._send(job_id, reply_to, timeout)

    pauses: list[float] = []

    def pause(seconds: float) -> None:
        pauses.append(seconds)
        time.sleep(seconds)

    with pytest.raises(services.PUBLISH_ERRORS) as refused:
        _publish(counted_send, "f" * 32, "reply.queue", sleep=pause)
    assert isinstance(refused.value, OperationalError), repr(refused.value)
    assert services._nacked(refused.value), repr(refused.value)  # a nack, not a broker out of reach
    assert [(job_id, reply_to) for job_id, reply_to, _ in sends] == [("f" * 32, "reply.queue")] * 2
    assert all(0 < timeout <= celeryconfig.PUBLISH_TIMEOUT_SECONDS for _, _, timeout in sends), sends
    base = celeryconfig.PUBLISH_RETRY_BASE_SECONDS
    assert len(pauses) == 1 and base / 2 <= pauses[0] <= base, pauses  # one pause, between the two sends


def test_a_nack_is_retried_on_its_connection_not_by_reconnecting_to_the_next_node(nacking_queue, monkeypatch):
    """py-amqp counts a nack as a recoverable connection error: kombu reconnected (switching node)
    for each, 3 new connections a send, 15 a job under _publish's attempts."""
    import amqp.connection

    connects = []
    real_connect = amqp.connection.Connection.connect

    def counting_connect(self, *args, **kwargs):
        connects.append(self.host)
        return real_connect(self, *args, **kwargs)

    with pytest.raises(OperationalError):
        services._send("d" * 32, None, 5.0)  # the pooled connection is made (and the queue declared)
    monkeypatch.setattr(amqp.connection.Connection, "connect", counting_connect)
    for _ in range(3):
        with pytest.raises(OperationalError) as nacked:
            services._send("d" * 32, None, 5.0)
        assert services._nacked(nacked.value)
    # A failed send's producer goes back to the pool without its connection (one connect when the
    # next send takes it); before, each send reconnected for each of its retries too: 9 here.
    assert len(connects) <= 3, connects
