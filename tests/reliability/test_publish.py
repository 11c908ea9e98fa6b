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
        self.calls.append((time.monotonic(), job_id, timeout))
        if len(self.calls) <= self.failures:
            raise self.error


def _nack() -> OperationalError:
    try:
        raise MessageNacked()
    except MessageNacked as e:
        try:
            raise OperationalError("") from e  # how kombu reports it
        except OperationalError as wrapped:
            return wrapped


def test_a_nacked_publish_is_retried_with_growing_jittered_delays():
    send = FlakySend(3, _nack())
    _publish(send, "a" * 32, None)
    assert len(send.calls) == 4
    gaps = [b[0] - a[0] for a, b in zip(send.calls, send.calls[1:])]
    base = celeryconfig.PUBLISH_RETRY_BASE_SECONDS
    for attempt, gap in enumerate(gaps):
        step = base * 2**attempt
        assert step / 2 <= gap < step + 0.05, gaps
    assert {job_id for _, job_id, _ in send.calls} == {"a" * 32}  # the same job each time: a duplicate runs once
    timeouts = [timeout for _, _, timeout in send.calls]
    assert all(0 < t <= celeryconfig.PUBLISH_TIMEOUT_SECONDS for t in timeouts)
    assert timeouts == sorted(timeouts, reverse=True)  # one budget for all attempts


def test_nacks_past_the_attempts_raise():
    send = FlakySend(100, _nack())
    with pytest.raises(OperationalError):
        _publish(send, "b" * 32, None)
    assert len(send.calls) == celeryconfig.PUBLISH_ATTEMPTS


def test_a_broker_that_cannot_be_reached_is_not_retried_here():
    send = FlakySend(100, OperationalError("[Errno 111] Connection refused"))
    with pytest.raises(OperationalError):
        _publish(send, "c" * 32, None)
    assert len(send.calls) == 1
