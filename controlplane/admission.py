"""Admission control: each API process bounds the resizes it works on and sheds the rest early,
with a status, a code and Retry-After, so admitted requests stay inside the latency SLO instead of
queues growing without bound (docs/adr/0006-admission-control.md has the numbers).

Every check reads memory; the request path never talks to the broker itself, and waits on it only at
the depth bound, for the probe's next reading, within ADMISSION_LINE_WAIT_SECONDS:
- how long jobs wait in the queue, as this process's finished jobs report it: an in-flight limit
  below ADMISSION_MAX_IN_FLIGHT that drops by a quarter after each ADMISSION_QUEUE_WAIT_INTERVAL_SECONDS
  in which no job started within ADMISSION_TARGET_QUEUE_WAIT_SECONDS (a standing queue, CoDel's
  test) and grows by one after each interval in which one did (AIMD); past it 503 `queue_full`.
  It follows the workers' real drain rate whatever the images cost (a fixed depth bound is right
  for one image mix only), and keeps admitting as many as keep the workers busy (ADR 0007);
- the resize queue's depth, refreshed off the request path by `QueueProbe` (one thread per
  process, a passive declare every ADMISSION_QUEUE_PROBE_SECONDS), plus what this process admitted
  since that reading: at ADMISSION_MAX_QUEUE_DEPTH ready jobs a new one would wait longer than the
  SLO allows, so it waits for the next reading (up to ADMISSION_LINE_WAIT_SECONDS), then 503
  `queue_full`;
- past half that depth, a customer sending more than ADMISSION_CUSTOMER_SHARE of this process's
  requests of the last second, and more than its slots' worth (below), while others ask too, is 429
  `customer_over_share`: one customer's flood is the first thing refused, before the queue is full
  for everyone;
- the customer's resizes in flight in this process: at max(1, ADMISSION_CUSTOMER_SHARE ×
  ADMISSION_MAX_IN_FLIGHT), 429 `customer_over_share`;
- the process's resizes in flight: at ADMISSION_MAX_IN_FLIGHT, 503 `overloaded`. The bound sits
  below the server's threads, so spare threads keep answering refusals, /readyz and job reads.
An unknown depth (broker away, probe stale) admits: the publish then decides (503 `queue_unavailable`).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from controlplane.per_process import PerProcess

log = logging.getLogger(__name__)
# Background threads draw their jitter from their own generator, never the global one.
_jitter = random.Random()


class Refused(Exception):
    """A resize refused before any work: an HTTP status, a stable code, a sentence, a Retry-After."""

    def __init__(self, status: int, code: str, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class _RecentRequests:
    """Requests for a slot per customer, admitted or not, over about the last `window` seconds: two
    buckets, the older one weighted by how much of it is still inside the window. Enough to tell a
    flood from a trickle. Requests, not admissions: counting admissions, a quiet customer refused
    `queue_full` (a flood had filled the queue) was no one to protect, so the flood went on filling it,
    and a flood held back at the bound made the quiet customer's one admission "most of the work"."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._start = time.monotonic()
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}

    def _roll(self, now: float) -> None:
        elapsed = now - self._start
        if elapsed >= 2 * self.window:
            self._previous, self._current, self._start = {}, {}, now
        elif elapsed >= self.window:
            self._previous, self._current, self._start = self._current, {}, self._start + self.window

    def add(self, customer_id: str, now: float) -> None:
        self._roll(now)
        self._current[customer_id] = self._current.get(customer_id, 0) + 1

    def share(self, customer_id: str, now: float) -> tuple[float, float, bool]:
        """(the customer's requests in the window, their share of all, whether anyone else asked in it)."""
        self._roll(now)
        # `now` may come before the window's start: a request's instant, taken before its wait at the
        # depth bound, while another thread rolled the window.
        weight = min(1.0, max(0.0, 1.0 - (now - self._start) / self.window))
        mine = self._current.get(customer_id, 0) + weight * self._previous.get(customer_id, 0)
        total = sum(self._current.values()) + weight * sum(self._previous.values())
        others = total - mine > 0.5
        return mine, (mine / total if total else 0.0), others


class _WaitLimit:
    """An in-flight limit that follows the queue wait (AIMD, with CoDel's test for a standing queue).
    At the end of each `interval`, the shortest queue wait this process's finished jobs reported in
    it decides: above `target` (not one job started in time: the queue is standing, not a burst)
    the limit drops by a quarter, so fewer admitted requests shorten the queue; under it, the limit
    grows by one, up to `ceiling`. Intervals without a report change nothing; two in a row with
    nothing in flight reset the limit to `ceiling` (idle: nothing to judge by). Silence while
    requests are in flight is no news: with waits of seconds, reports come less than once an
    interval, and resetting then would let a burst in just when the queue stands (it did)."""

    def __init__(self, target: float, interval: float, ceiling: int, clock: Callable[[], float]) -> None:
        self.target, self.interval, self.ceiling, self._clock = target, interval, ceiling, clock
        self._limit = float(ceiling)
        self._start = clock()
        self._shortest: float | None = None  # in the current interval
        self._last_seen = clock()
        self._lock = threading.Lock()

    def observe(self, wait: float) -> None:
        with self._lock:
            self._last_seen = self._roll(idle=False)
            self._shortest = wait if self._shortest is None else min(self._shortest, wait)

    def limit(self, idle: bool) -> int:
        """`idle`: nothing is in flight in this process now."""
        with self._lock:
            self._roll(idle)
            return max(1, int(self._limit))

    def _roll(self, idle: bool) -> float:
        now = self._clock()
        if now - self._start >= self.interval:
            if self._shortest is not None:
                self._limit = max(1.0, self._limit * 0.75) if self._shortest > self.target \
                    else min(float(self.ceiling), self._limit + 1)
            elif idle and now - self._last_seen >= 2 * self.interval:
                self._limit = float(self.ceiling)
            self._shortest, self._start = None, now
        return now


class _Waiter:
    """A request in the admission line: `admitted` is set (with `event`) when a slot is handed to it."""

    __slots__ = ("customer_id", "event", "admitted")

    def __init__(self, customer_id: str) -> None:
        self.customer_id, self.event, self.admitted = customer_id, threading.Event(), False


class Admission:
    """One API process's admission state: enter(customer_id) takes a slot for a request's life, leave() gives it back.

    At the wait-driven limit a request may stand in a short FIFO line (`line_wait` seconds at most)
    for the next slot given back, instead of a 503 at once: a slot comes free every few tens of
    milliseconds under load, and a refusal costs its client a second (Retry-After) and a new draw
    against every newcomer, so past the knee some images were refused again and again (ADR 0007).
    Requests in the line count against the static bound with those in flight, so the threads kept
    free for refusals and /readyz stay free, and against their customer's share."""

    def __init__(self, *, max_in_flight: int, customer_share: float, max_queue_depth: int,
                 queue_depth: Callable[[], int | None], target_queue_wait: float = 0.0,
                 queue_wait_interval: float = 0.5, line_wait: float = 0.0,
                 depth_read_at: Callable[[], float] | None = None,
                 depth_wait: Callable[[float, float], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_in_flight = max_in_flight
        self.customer_share = customer_share
        self.customer_slots = max(1, int(customer_share * max_in_flight))
        self.max_queue_depth = max_queue_depth  # 0: no depth check
        self.line_wait = line_wait  # 0: no line, refuse at the limit at once
        self._queue_depth = queue_depth
        # When the depth was read (None: the reading is taken as it is). The depth a process acts on is
        # that reading plus its own jobs the reading cannot hold: an asynchronous request gives its slot
        # back at the 202, so between readings a flood was admitted at the API's own pace (a bound of 25
        # read 146-171 jobs ready, the load review), and the queue swung between empty and several times
        # the bound. Those jobs are the requests admitted and not yet published or given up (whatever
        # the readings: until 2026-11-23 one admitted before a reading and published after it, a long
        # upload, dropped out of the count at that reading), and the jobs published since the reading
        # began (`published`; one the reading holds already is counted twice until the next one).
        self._depth_read_at = depth_read_at
        self._depth_reading = -1.0
        self._in_transit = 0
        # Pruned at each new reading; with none coming (a probe stuck while publishes go through, or no
        # reading at all) it keeps the latest: more than the bound would refuse alike.
        self._published_at: deque[float] = deque(maxlen=max(1, max_queue_depth))
        # (a reading's time, timeout): returns once there is a newer reading, or at the timeout. At the
        # bound a request waits for it (up to `line_wait`) instead of being refused at once: the bound
        # is ~0.25 s of the workers' work and a refusal's Retry-After 1 s, so clients that honour it
        # slept while the queue ran dry (a lone asynchronous flood admitted 780 jobs in 20 s where the
        # workers drain ~1,600).
        self._depth_wait = depth_wait if depth_read_at is not None else None  # no reading to wait past
        self._depth_waiters = 0
        self._lock = threading.Lock()
        self.in_flight = 0
        self._line: deque[_Waiter] = deque()
        self._held: dict[str, int] = {}  # per customer: in flight and in the line
        self._recent = _RecentRequests()
        # 0: no wait check.
        self._waits = _WaitLimit(target_queue_wait, queue_wait_interval, max_in_flight, clock) \
            if target_queue_wait > 0 else None

    def observe_queue_wait(self, seconds: float) -> None:
        """A job this process waited on started after `seconds` in the queue."""
        if self._waits is not None:
            self._waits.observe(seconds)

    def limit(self) -> int:
        """The resizes this process admits at once now: the wait-driven limit, or the static bound."""
        return self._waits.limit(idle=self.in_flight == 0) if self._waits is not None else self.max_in_flight

    @property
    def in_line(self) -> int:
        return len(self._line)

    def enter(self, customer_id: str) -> None:
        """Take a slot for the customer (standing in the line for one if there is room), or raise Refused."""
        limit = self.limit()
        now = time.monotonic()
        # One wait for admission, at the depth bound and in the line together: at 0.2 s the admitted
        # requests' p99 left the SLO (ADR 0007), so the line's wait bounds both.
        deadline = now + self.line_wait
        depth = self._depth_below_bound(customer_id, now, deadline)
        with self._lock:
            self._hand_slots(limit)  # the limit may have grown since the last slot was given back
            held = self._held.get(customer_id, 0)
            if held >= self.customer_slots:
                raise Refused(429, "customer_over_share", f"This account already has {held} resizes in progress "
                              "on this server; wait for them before sending more.", 1)
            if self.in_flight >= self.max_in_flight:
                raise Refused(503, "overloaded", "The server is at capacity; retry shortly.", 1)
            if depth is not None and depth >= self.max_queue_depth / 2:
                # A customer asking no more than its slots' worth a second is never the flood: its share
                # can still pass half when the flood's clients sleep out their refusals (Retry-After) and
                # the rest of the flood, on another process's connections, fills the queue (7 of 40 quiet
                # requests refused, bench_async_flood; a quiet client asks 2-5 a second).
                mine, share, others = self._recent.share(customer_id, time.monotonic())  # after any wait above
                if others and share > self.customer_share and mine > self.customer_slots:
                    raise Refused(429, "customer_over_share", "The service is busy and this account is sending most "
                                  "of its work; slow down and retry shortly.", 1)
            if self.in_flight < limit and not self._line:
                self.in_flight += 1
                self._held[customer_id] = held + 1
                self._in_transit += 1
                return
            if self.line_wait <= 0 or self.in_flight + len(self._line) + self._depth_waiters >= self.max_in_flight:
                raise self._full()
            waiter = _Waiter(customer_id)
            self._line.append(waiter)
            self._held[customer_id] = held + 1
        waiter.event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if waiter.admitted:  # a slot was handed to it (perhaps just as the wait ended)
                self._in_transit += 1
                return
            self._line.remove(waiter)
            self._release(customer_id)
        raise self._full()

    def _depth_below_bound(self, customer_id: str, now: float, deadline: float) -> int | None:
        """The queue's depth (None: unknown, or no depth check) once it is below the bound; at the bound,
        the request waits until `deadline` (the line's wait) for the probe's next reading, and is refused
        503 `queue_full` if that still says full. Waiters count with those in flight and in line against
        the static bound, and against their customer's slots: a flood must not take every place to wait,
        and refuse a quiet customer arriving then."""
        if not self.max_queue_depth:
            return None
        waiting = False
        try:
            while True:
                with self._lock:
                    depth = self._depth()
                    if not waiting:
                        self._recent.add(customer_id, now)
                    if depth is None or depth < self.max_queue_depth:
                        return depth
                    remaining = deadline - time.monotonic()
                    if self._depth_wait is None or remaining <= 0 or not waiting and (
                            self.in_flight + len(self._line) + self._depth_waiters >= self.max_in_flight
                            or self._held.get(customer_id, 0) >= self.customer_slots):
                        raise Refused(503, "queue_full", f"The service is at capacity ({depth} jobs waiting); "
                                      "retry shortly.", 1)
                    if not waiting:
                        self._depth_waiters, waiting = self._depth_waiters + 1, True
                        self._held[customer_id] = self._held.get(customer_id, 0) + 1
                    reading = self._depth_reading
                self._depth_wait(reading, remaining)
        finally:
            if waiting:
                with self._lock:
                    self._depth_waiters -= 1
                    self._release(customer_id)

    def _depth(self) -> int | None:
        """The queue's depth as this process knows it: the last reading, plus the jobs of this process it
        cannot hold (admitted and on their way to the queue, or published since it began). Under the lock."""
        depth = self._queue_depth()
        if depth is None or self._depth_read_at is None:
            return depth
        read_at = self._depth_read_at()
        if read_at != self._depth_reading:
            self._depth_reading = read_at
            while self._published_at and self._published_at[0] < read_at:
                self._published_at.popleft()  # in the queue when the reading began: the reading holds it
        return depth + self._in_transit + len(self._published_at)

    def published(self) -> None:
        """An admitted request put its job in the queue: counted from now until a reading that began
        after this. Once per request at most, before its leave(published=True)."""
        with self._lock:
            self._in_transit -= 1
            self._published_at.append(time.monotonic())

    def leave(self, customer_id: str, published: bool = False) -> None:
        """An admitted request gives its slot back. One that published no job (refused after admission,
        an idempotent replay) is no longer on its way to the queue."""
        limit = self.limit()
        with self._lock:
            self.in_flight -= 1
            if not published:
                self._in_transit -= 1
            self._release(customer_id)
            self._hand_slots(limit)

    def _full(self) -> Refused:
        if self._waits is None:
            return Refused(503, "queue_full", "The service is at capacity; retry shortly.", 1)
        return Refused(503, "queue_full", f"The service is at capacity (jobs wait more than "
                       f"{self._waits.target * 1000:.0f} ms to start); retry shortly.", 1)

    def _release(self, customer_id: str) -> None:
        _count_down(self._held, customer_id)

    def _hand_slots(self, limit: int) -> None:
        """Slots below the limit go to the line's first requests, in order (under the lock)."""
        while self._line and self.in_flight < limit:
            waiter = self._line.popleft()
            waiter.admitted = True
            self.in_flight += 1
            waiter.event.set()


class QueueProbe:
    """The ready messages and consumers of some queues, read by a background thread on its own broker
    connection every `interval` seconds (a passive declare). Readers get the last values, or nothing
    once they are older than `stale_after` (broker away or slow), without waiting on the broker; only
    fresh() and wait_newer() wait for a probe, each within the timeout it is given."""

    RETRY_CUT_SECONDS = 1.0
    # The least time between two probes when a reader asks for a newer reading (wait_newer).
    MIN_INTERVAL_SECONDS = 0.05

    def __init__(self, queues: tuple[str, ...], connection_factory: Callable[[], Any], interval: float = 0.5,
                 stale_after: float | None = None) -> None:
        self.queues = queues
        self.interval = interval
        self.stale_after = stale_after if stale_after is not None else max(2.0, 4 * interval)
        self._connection_factory = connection_factory
        self._values: dict[str, tuple[int, int]] = {}
        self._at = 0.0  # monotonic time the last successful probe began
        self.first = threading.Event()  # set after the first attempt, successful or not
        self._retry_now = threading.Event()  # cuts a backoff short (fresh())
        self._wanted = threading.Event()  # a reader waits for a newer reading (wait_newer): probe soon
        self._retry_cut_at = -1.0  # monotonic time fresh() last cut one
        self._probed = threading.Condition()  # notified after each successful probe
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="queue-probe", daemon=True).start()

    def stop(self) -> None:
        """End the probe's thread and its connection (within one interval, or one backoff)."""
        self._stopped.set()
        self._retry_now.set()
        self._wanted.set()

    def values(self) -> dict[str, tuple[int, int]] | None:
        """{queue: (ready, consumers)} from the last probe, or None when there is no fresh one."""
        if time.monotonic() - self._at > self.stale_after:
            return None
        return dict(self._values)

    def fresh(self, timeout: float) -> dict[str, tuple[int, int]] | None:
        """values(), or when they are stale, the next successful probe's within `timeout`: a probe waiting
        out its backoff after a failure tries again at once (/readyz, asked every few seconds, so a
        broker that is back is seen as soon as it is asked about, not after the backoff)."""
        values = self.values()
        if values is not None:
            return values
        with self._probed:
            if time.monotonic() - self._retry_cut_at >= self.RETRY_CUT_SECONDS:
                # At most one cut a second: every check of every load balancer must not turn the
                # jittered backoff into reconnects at their pace, in step across the processes.
                self._retry_cut_at = time.monotonic()
                self._retry_now.set()
            self._probed.wait_for(lambda: self.values() is not None, timeout)
        return self.values()

    @property
    def read_at(self) -> float:
        """When the last successful probe began reading the queues (monotonic)."""
        return self._at

    def wait_newer(self, than: float, timeout: float) -> None:
        """Return once a probe newer than the one read at `than` succeeded, or after `timeout` seconds. The
        probe reads at once, or MIN_INTERVAL_SECONDS after its last reading: the depth is read every
        `interval` while nobody waits on it (each reading costs the process ~0.1 ms of CPU: at 0.1 s,
        11 ms a second an API process), and as often as it is needed while requests wait at the bound."""
        self._wanted.set()
        with self._probed:
            self._probed.wait_for(lambda: self._at != than, timeout)

    def ready(self, queue: str) -> int | None:
        values = self.values()
        if values is None or queue not in values:
            return None
        return values[queue][0]

    def _run(self) -> None:
        backoff = self.interval
        while not self._stopped.is_set():
            try:
                with self._connection_factory() as connection:
                    connection.ensure_connection(max_retries=1, timeout=2)
                    channel = connection.channel()
                    while not self._stopped.is_set():
                        # The reading's time is when it began: a job published after that may not be in
                        # it (Admission counts those on top of it), one published before is.
                        asked = time.monotonic()
                        values: dict[str, tuple[int, int]] = {}
                        for name in self.queues:
                            try:
                                _, ready, consumers = channel.queue_declare(queue=name, passive=True)
                                values[name] = (ready, consumers)
                            except Exception as e:
                                # Not declared yet. The 404 closes the channel, and py-amqp reopens the
                                # same channel by itself: opening another here leaked one every probe.
                                if not _is_not_found(e):
                                    raise
                        with self._probed:
                            self._values, self._at = values, asked
                            self._probed.notify_all()
                        self._retry_now.clear()  # asked for while this round was out: answered
                        self.first.set()
                        backoff = self.interval
                        self._pause()
            except Exception as e:  # broker away: keep trying, readers see no fresh value meanwhile
                log.debug("queue probe failed: %s", e)
                self.first.set()
                # Exponential backoff with jitter, capped: every API process probes, and they must
                # not reconnect in step when the broker returns.
                if self._retry_now.wait(backoff * (0.5 + _jitter.random())) and not self._stopped.is_set():
                    self._retry_now.clear()
                backoff = min(backoff * 2, 5.0)

    def _pause(self) -> None:
        """Until the next probe: `interval`, or less when a reader wants a newer reading, but never less
        than MIN_INTERVAL_SECONDS."""
        started = time.monotonic()
        self._wanted.wait(self.interval)
        self._wanted.clear()
        rest = self.MIN_INTERVAL_SECONDS - (time.monotonic() - started)
        if rest > 0:
            self._stopped.wait(rest)


def _is_not_found(error: Exception) -> bool:
    return getattr(error, "code", None) == 404 or type(error).__name__ == "NotFound"


def _count_down(held: dict[str, int], customer_id: str) -> None:
    """One fewer held by the customer; a customer holding none leaves the map (it would grow with every
    customer ever seen). Under its owner's lock."""
    count = held.get(customer_id, 0) - 1
    if count > 0:
        held[customer_id] = count
    else:
        held.pop(customer_id, None)


class CustomerThreads:
    """How many of this process's threads each customer's requests hold, from authentication until
    their answer has been written (a streamed result: its last piece), at most `limit` each. The resize
    slots above end when the job does; a client reading its answers slowly (above the least rate: a
    large result takes minutes) held a thread on past them, and one customer's slow downloads could
    take every thread of every node (found by the security review)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, customer_id: str) -> bool:
        with self._lock:
            held = self._held.get(customer_id, 0)
            if held >= self.limit:
                return False
            self._held[customer_id] = held + 1
            return True

    def give(self, customer_id: str) -> None:
        with self._lock:
            _count_down(self._held, customer_id)

    def held(self, customer_id: str) -> int:
        with self._lock:
            return self._held.get(customer_id, 0)


# --- the process's instances (made after fork: threads do not survive one) -----------------------

def probe_connection() -> Any:
    """The probe's connection: its own socket timeouts (a broker that accepts but never answers must not
    hang the probe) and heartbeats (the broker drops a dead API host's connection within two)."""
    from controlplane.celery import app

    return app.connection_for_read(transport_options={"read_timeout": 2, "write_timeout": 2},
                                   heartbeat=app.conf.broker_heartbeat)


def _queue_probe() -> QueueProbe:
    """The probe of the resize queue and its dead-letter queue."""
    import celeryconfig
    from django.conf import settings

    return QueueProbe((celeryconfig.resize_queue.name, celeryconfig.dead_letter_queue.name), probe_connection,
                      interval=settings.ADMISSION_QUEUE_PROBE_SECONDS)


def _admission() -> Admission:
    """The admission state, sized from settings, reading the process's probe."""
    import celeryconfig
    from django.conf import settings

    probe, queue = queue_probe(), celeryconfig.resize_queue.name
    return Admission(max_in_flight=settings.ADMISSION_MAX_IN_FLIGHT,
                     customer_share=settings.ADMISSION_CUSTOMER_SHARE,
                     max_queue_depth=settings.ADMISSION_MAX_QUEUE_DEPTH,
                     queue_depth=lambda: probe.ready(queue), depth_read_at=lambda: probe.read_at,
                     depth_wait=probe.wait_newer,
                     target_queue_wait=settings.ADMISSION_TARGET_QUEUE_WAIT_SECONDS,
                     queue_wait_interval=settings.ADMISSION_QUEUE_WAIT_INTERVAL_SECONDS,
                     line_wait=settings.ADMISSION_LINE_WAIT_SECONDS)


def _customer_threads() -> CustomerThreads:
    from django.conf import settings

    return CustomerThreads(settings.CUSTOMER_MAX_THREADS)


queue_probe = PerProcess(_queue_probe)
admission = PerProcess(_admission)
customer_threads = PerProcess(_customer_threads)
