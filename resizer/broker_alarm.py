"""RabbitMQ's resource alarms as a publisher sees them.

When a node runs short of memory or disk it stops reading from every connection that publishes and
sends each one `connection.blocked` (docs: rabbitmq.com/connection-blocked). A publish waiting for its
confirm then waited out PUBLISH_TIMEOUT_SECONDS, and leaving the pooled producer closed the connection
with a handshake the broker never read: a resize request hung for as long as the alarm lasted (40 s,
98 s in the failure review), holding its thread and its customer's admission slots.

py-amqp calls `on_blocked` (celeryconfig.broker_transport_options) in the thread reading the connection.
In a thread inside `with publishing:` (resizer.services._publish_on) it raises BrokerBlocked, which ends the
confirm wait at once; the publisher then drops the connection without the close handshake. Anywhere
else (the reply consumer, the queue probe, a worker) it only records the alarm. No Django here: celeryconfig
imports this module."""
from __future__ import annotations

import threading
import time


class BrokerBlocked(Exception):
    """The broker blocked this connection's publishes (a memory or disk alarm)."""


_local = threading.local()
# Monotonic time a publish here was last refused by an alarm, until one passes (one assignment: atomic).
_refused_at: float | None = None


class _Publishing:
    """`with publishing:` around the calling thread's publish: a `connection.blocked` read meanwhile
    raises BrokerBlocked in it. A plain class, not a generator context manager: it runs on every job."""

    def __enter__(self) -> None:
        _local.publishing = True

    def __exit__(self, *exc: object) -> None:
        _local.publishing = False


publishing = _Publishing()


def on_blocked(reason: str) -> None:
    if getattr(_local, "publishing", False):
        raise BrokerBlocked(reason)


def on_unblocked() -> None:
    published()


def refused() -> None:
    """A publish here was refused because of an alarm."""
    global _refused_at
    _refused_at = time.monotonic()


def published() -> None:
    """A publish here went through (or the broker said the alarm is over)."""
    global _refused_at
    if _refused_at is not None:
        _refused_at = None


REFUSED_RECENTLY_SECONDS = 30.0


def refused_ago() -> float | None:
    """Seconds since a publish here was last refused by an alarm, with none through since; None if not,
    or if that was over REFUSED_RECENTLY_SECONDS ago (no publish since has said whether it is over)."""
    at = _refused_at
    ago = None if at is None else time.monotonic() - at
    return ago if ago is not None and ago <= REFUSED_RECENTLY_SECONDS else None
