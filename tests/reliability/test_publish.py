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


class FlakyTask:
    """Stands in for the Celery task: fails its first publishes with `error`, then accepts."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, []

    def apply_async(self, **options):  # type: ignore[no-untyped-def]
        self.calls.append((time.monotonic(), options))
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
    task = FlakyTask(3, _nack())
    _publish(task, "a" * 32, None)
    assert len(task.calls) == 4
    gaps = [b[0] - a[0] for a, b in zip(task.calls, task.calls[1:])]
    base = celeryconfig.PUBLISH_RETRY_BASE_SECONDS
    for attempt, gap in enumerate(gaps):
        step = base * 2**attempt
        assert step / 2 <= gap < step + 0.05, gaps
    options = task.calls[-1][1]
    assert options["task_id"] == "a" * 32  # the same job each time: a duplicate would run once
    assert options["time_limit"] is None and options["soft_time_limit"] is None  # the worker's limits apply
    assert 0 < options["confirm_timeout"] <= celeryconfig.PUBLISH_TIMEOUT_SECONDS


def test_nacks_past_the_attempts_raise():
    task = FlakyTask(100, _nack())
    with pytest.raises(OperationalError):
        _publish(task, "b" * 32, None)
    assert len(task.calls) == celeryconfig.PUBLISH_ATTEMPTS


def test_a_broker_that_cannot_be_reached_is_not_retried_here():
    task = FlakyTask(100, OperationalError("[Errno 111] Connection refused"))
    with pytest.raises(OperationalError):
        _publish(task, "c" * 32, None)
    assert len(task.calls) == 1
