"""The publish retry policy (resizer.services._publish): a nack is retried with exponential backoff and
jitter within the publish budget; a connection failure (kombu already tried every node) is not. The
real thing, a quorum queue between leaders, is in test_chaos.py (the leader kill)."""
from __future__ import annotations

import time

import pytest
from amqp.exceptions import MessageNacked
from kombu.exceptions import OperationalError

import celeryconfig
from resizer.services import _publish


class FlakySend:
    """Stands in for resizer.services._send: fails its first publishes with `error`, then accepts."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, []

    def __call__(self, job_id: str, reply_to: str | None, timeout: float) -> None:
        self.calls.append((job_id, timeout))
        if len(self.calls) <= self.failures:
            raise self.error


class Pauses:
    """Stands in for _publish's sleep: notes each delay asked for and, when `real`, takes it (so the
    publish budget runs down between attempts as it would)."""

    def __init__(self, real: bool) -> None:
        self.real, self.delays = real, []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.real:
            time.sleep(seconds)


def _nack() -> OperationalError:
    try:
        raise MessageNacked()
    except MessageNacked as e:
        try:
            raise OperationalError("") from e  # how kombu reports it
        except OperationalError as wrapped:
            return wrapped


def test_a_nacked_publish_is_retried_with_growing_jittered_delays():
    send, pauses = FlakySend(3, _nack()), Pauses(real=True)
    _publish(send, "a" * 32, None, sleep=pauses)
    assert len(send.calls) == 4
    # The delays asked for, not the time they took: exponential, each with "equal jitter".
    assert len(pauses.delays) == 3
    base = celeryconfig.PUBLISH_RETRY_BASE_SECONDS
    for attempt, delay in enumerate(pauses.delays):
        step = base * 2**attempt
        assert step / 2 <= delay <= step, pauses.delays
    assert {job_id for job_id, _ in send.calls} == {"a" * 32}  # the same job each time: a duplicate runs once
    timeouts = [timeout for _, timeout in send.calls]
    assert all(0 < t <= celeryconfig.PUBLISH_TIMEOUT_SECONDS for t in timeouts)
    # One budget for all attempts: each is given at most what the pauses before it left of it (a
    # fresh PUBLISH_TIMEOUT_SECONDS each would exceed this; a loaded machine only leaves less).
    for attempt, timeout in enumerate(timeouts):
        assert timeout <= celeryconfig.PUBLISH_TIMEOUT_SECONDS - sum(pauses.delays[:attempt]), (timeouts, pauses.delays)


def test_nacks_past_the_attempts_raise():
    send, pauses = FlakySend(100, _nack()), Pauses(real=False)
    with pytest.raises(OperationalError):
        _publish(send, "b" * 32, None, sleep=pauses)
    assert len(send.calls) == celeryconfig.PUBLISH_ATTEMPTS
    assert len(pauses.delays) == celeryconfig.PUBLISH_ATTEMPTS - 1  # a pause between attempts, none after the last


def test_a_broker_that_cannot_be_reached_is_not_retried_here():
    send, pauses = FlakySend(100, OperationalError("[Errno 111] Connection refused")), Pauses(real=False)
    with pytest.raises(OperationalError):
        _publish(send, "c" * 32, None, sleep=pauses)
    assert len(send.calls) == 1 and pauses.delays == []


def test_a_nack_is_retried_on_its_connection_not_by_reconnecting_to_the_next_node(monkeypatch):
    """py-amqp counts a nack as a recoverable connection error: kombu reconnected (switching node)
    for each, 3 new connections a send, 15 a job under _publish's attempts. A queue that nacks every
    publish (a full queue set to reject-publish) stands in for one between leaders."""
    import uuid

    import amqp.connection
    from kombu import Exchange, Queue

    from controlplane.celery import app
    from resizer import services

    name = f"test.nacking.{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="topic", durable=False)
    queue = Queue(name, exchange, routing_key="#", durable=False,
                  queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    monkeypatch.setattr(celeryconfig, "resize_exchange", exchange)
    monkeypatch.setattr(celeryconfig, "resize_queue", queue)
    connects = []
    real_connect = amqp.connection.Connection.connect

    def counting_connect(self, *args, **kwargs):
        connects.append(self.host)
        return real_connect(self, *args, **kwargs)

    try:
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
    finally:
        with app.connection_for_write() as connection:
            channel = connection.channel()
            queue.bind(channel).delete()
            exchange.bind(channel).delete()
