"""Result return: how a synchronous request learns, without polling, that its job finished.

Each API process owns one exclusive, auto-deleted reply queue on the broker and consumes it on a
background thread. A job is published with `reply_to` = that queue; the worker that finishes the
job publishes a tiny completion message there, and the thread wakes the request waiting on it.
The message carries only the job id and status: the result itself is read from the staging store.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from kombu import Connection, Consumer, Queue

from controlplane.per_process import PerProcess

log = logging.getLogger(__name__)
# Background threads draw their jitter from their own generator, never the global one.
_jitter = random.Random()

# Far above the requests one process can have in flight; past it the map only holds leftovers.
_MAX_EXPECTED = 10_000


def _reply_queue_name() -> str:
    return f"reply.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


class JobWaiter:
    def __init__(self, connection_factory: Any) -> None:
        self._connection_factory = connection_factory
        self.queue_name = _reply_queue_name()
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()  # set while the reply queue is declared and consumed
        self._connected_once = False
        self._thread = threading.Thread(target=self._run, name="job-waiter", daemon=True)
        self._thread.start()

    def usable(self, startup_wait: float = 0.5) -> bool:
        """Whether completion notices can reach this process now. Only a waiter that never connected
        yet (a process's first requests) is waited for: one that lost its broker answers at once."""
        if self.ready.is_set():
            return True
        return not self._connected_once and self.ready.wait(startup_wait)

    def expect(self, job_id: str, reply_to: str) -> None:
        """Register interest before publishing the job (with `reply_to`, the queue name the caller read
        from this waiter), so a fast completion cannot be missed. When the waiter reconnected since
        that name was read (its old queue, and the notice sent to it, are gone; the reconnect woke
        only the jobs already expected) or has no queue now, the job's wait returns at once: the
        caller looks at the job instead of waiting a second for nothing."""
        event = threading.Event()
        with self._lock:
            if len(self._events) > _MAX_EXPECTED:  # only requests that died between expect and wait
                self._events.clear()
            if reply_to != self.queue_name or not self.ready.is_set():
                event.set()
            self._events[job_id] = event

    def wait(self, job_id: str, timeout: float) -> bool:
        """True when the job's completion arrived within `timeout` seconds, or when this waiter lost
        its broker meanwhile (notices sent during the gap are lost: the caller must look at the job),
        or when nothing waits for the job here (never expected, or cleared): no notice can wake the
        caller, who must look at the job (or poll it) instead of asking again at once."""
        with self._lock:
            event = self._events.get(job_id)
        return event.wait(timeout) if event is not None else True

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._events.pop(job_id, None)

    def _wake_all(self) -> None:
        with self._lock:
            for event in self._events.values():
                event.set()

    def _on_message(self, body: Any, message: Any) -> None:
        job_id = message.properties.get("correlation_id") or (body or {}).get("job_id")
        with self._lock:
            event = self._events.get(job_id)
        if event is not None:
            event.set()

    def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                with self._connection_factory() as connection:
                    # A name of its own for each connection: the broker may still hold the last one's
                    # exclusive queue (its connection not yet seen dead), and redeclaring it is refused.
                    with self._lock:  # expect() compares names under it
                        self.queue_name = _reply_queue_name()
                    queue = Queue(
                        self.queue_name,
                        exclusive=True,
                        auto_delete=True,
                        durable=False,
                        queue_arguments={"x-queue-type": "classic"},
                    )
                    with Consumer(connection, [queue], callbacks=[self._on_message], no_ack=True,
                                  accept=["json"]):
                        self.ready.set()
                        self._connected_once = True
                        backoff = 0.1
                        while True:
                            try:
                                connection.drain_events(timeout=1.0)
                            except socket.timeout:
                                pass
                            # Every pass, not only when idle: with a notice a second or more the drain
                            # never times out, and a broker that died silently would go unnoticed.
                            connection.heartbeat_check()
            except Exception as e:  # broker gone: keep trying; the waiting requests look at their jobs meanwhile
                self.ready.clear()
                self._wake_all()
                log.warning("job waiter lost the broker (%s); reconnecting in %.1fs", e, backoff)
                time.sleep(backoff * (0.5 + _jitter.random()))
                backoff = min(backoff * 2, 5.0)


def reply_connection() -> Connection:
    """The waiter's connection, with heartbeats (Celery leaves them off unless asked): a broker host
    that dies without closing the socket is noticed in ~2 heartbeats, not when TCP gives up minutes
    later, and the broker drops a dead API host's connection and exclusive reply queue as soon."""
    from controlplane.celery import app

    return app.connection_for_read(heartbeat=app.conf.broker_heartbeat)


def _job_waiter() -> JobWaiter:
    return JobWaiter(reply_connection)


# The process's waiter, made on first use (its consumer thread does not survive a fork).
job_waiter = PerProcess(_job_waiter)


NOTIFY_TIMEOUT_SECONDS = 0.5


def job_notify(*, producer: Any, reply_to: str | None, job_id: str, status: str) -> None:
    """Tell the waiting API process (if any) that the job finished. Best effort: a lost notice only
    means the request answers 202 and the client fetches the job by its Location."""
    if not reply_to:
        return
    try:
        producer.publish(
            {"job_id": job_id, "status": status},
            exchange="",
            routing_key=reply_to,
            correlation_id=job_id,
            serializer="json",
            delivery_mode=1,
            retry=False,
            # The children's producers wait for confirms (broker_transport_options), with no bound of
            # their own: a broker that blocks publishers (a memory or disk alarm) held every finished
            # job's child until its time limit. The notice is a hint; the API re-reads the job anyway.
            timeout=NOTIFY_TIMEOUT_SECONDS,
            confirm_timeout=NOTIFY_TIMEOUT_SECONDS,
        )
    except SoftTimeLimitExceeded:
        raise  # the task's own time limit, not the notice's failure
    except Exception as e:
        log.warning("could not notify %s of job %s: %s", reply_to, job_id, e)
