"""Admission control (controlplane/admission.py): the bounds, one at a time, then the queue probe it
reads against the real broker, then the view answering each refusal as a problem with Retry-After."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from django.conf import settings
from kombu import Connection, Producer, Queue

from controlplane import admission as admission_module
from controlplane.admission import Admission, QueueProbe, Refused
from tests.conftest import corpus
from tests.processes import free_port


def _admission(depth: int | None = None, max_in_flight: int = 4, share: float = 0.5, max_depth: int = 10) -> Admission:
    return Admission(max_in_flight=max_in_flight, customer_share=share, max_queue_depth=max_depth,
                     queue_depth=lambda: depth)


def _refusal(a: Admission, customer: str) -> tuple[int, str] | None:
    try:
        a.enter(customer)
    except Refused as e:
        assert e.retry_after >= 1 and e.detail
        return e.status, e.code
    return None


def test_a_customer_holds_at_most_its_share_of_the_slots_and_others_still_get_in():
    a = _admission(max_in_flight=4, share=0.5)
    assert a.customer_slots == 2
    assert _refusal(a, "flood") is None and _refusal(a, "flood") is None
    assert _refusal(a, "flood") == (429, "customer_over_share")
    assert _refusal(a, "other") is None  # the flood did not take the others' room
    a.leave("flood")
    assert _refusal(a, "flood") is None  # a slot given back is a slot to take


def test_past_the_process_bound_everyone_is_503_overloaded_until_a_slot_frees():
    a = _admission(max_in_flight=4, share=0.5)
    for customer in ("a", "a", "b", "b"):
        assert _refusal(a, customer) is None
    assert a.in_flight == 4
    assert _refusal(a, "c") == (503, "overloaded")
    a.leave("b")
    assert _refusal(a, "c") is None
    assert a.in_flight == 4


def test_share_is_at_least_one_slot():
    assert _admission(max_in_flight=1, share=0.1).customer_slots == 1


def test_a_full_queue_is_503_queue_full_and_an_unknown_depth_admits():
    assert _refusal(_admission(depth=10, max_depth=10), "a") == (503, "queue_full")
    assert _refusal(_admission(depth=9, max_depth=10), "a") is None
    assert _refusal(_admission(depth=None, max_depth=10), "a") is None  # broker away: the publish decides
    assert _refusal(_admission(depth=10_000, max_depth=0), "a") is None  # 0: no depth check


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _waits(target: float = 0.25, interval: float = 0.5, max_in_flight: int = 8) -> tuple[Admission, FakeClock]:
    clock = FakeClock()
    return Admission(max_in_flight=max_in_flight, customer_share=1.0, max_queue_depth=0, queue_depth=lambda: None,
                     target_queue_wait=target, queue_wait_interval=interval, clock=clock), clock


def _admitted(a: Admission) -> int:
    """How many requests get in before the first refusal (all slots are given back after)."""
    n = 0
    while (refusal := _refusal(a, f"c{n}")) is None:
        n += 1
    assert refusal == (503, "queue_full") or n == a.max_in_flight
    for i in range(n):
        a.leave(f"c{i}")
    return n


def _interval(a: Admission, clock: FakeClock, waits: list[float]) -> None:
    for wait in waits:
        a.observe_queue_wait(wait)
        clock.now += 0.51 / len(waits)  # the interval (0.5 s) ends with its last report


def test_a_standing_queue_cuts_the_in_flight_limit_and_a_job_started_in_time_raises_it():
    a, clock = _waits(max_in_flight=8)
    assert _admitted(a) == 8
    _interval(a, clock, [0.3, 0.6, 0.4])  # not one job started within 250 ms: a standing queue
    assert _admitted(a) == 6  # a quarter less
    _interval(a, clock, [0.5, 0.3])
    assert _admitted(a) == 4
    _interval(a, clock, [0.4, 0.1, 0.5])  # one started in time: a burst draining
    assert _admitted(a) == 5
    for _ in range(10):
        _interval(a, clock, [0.05])
    assert _admitted(a) == 8  # back up to the static bound, never past it


def test_long_waits_decide_nothing_before_their_interval_ends():
    a, clock = _waits(max_in_flight=8)
    a.observe_queue_wait(0.9)
    clock.now += 0.1
    assert _admitted(a) == 8


def test_the_limit_never_drops_below_one():
    a, clock = _waits(max_in_flight=4)
    for _ in range(20):
        _interval(a, clock, [5.0])
    assert _admitted(a) == 1


def test_with_no_finished_jobs_to_judge_by_the_limit_returns_to_the_static_bound():
    a, clock = _waits(max_in_flight=8)
    for _ in range(3):
        _interval(a, clock, [2.0])
    assert _admitted(a) < 8
    clock.now += 1.5  # no report for more than two intervals
    assert _admitted(a) == 8


def test_silence_while_requests_wait_keeps_the_limit_down():
    """Waits of seconds mean reports come less than once an interval: that silence is the standing
    queue itself, not idleness. The limit stays down while requests are in flight (it reset to the
    static bound, letting a burst in just when the queue stood), and resets once nothing is."""
    a, clock = _waits(max_in_flight=8)
    for _ in range(3):
        _interval(a, clock, [3.0])
    low = _admitted(a)
    assert low < 8
    a.enter("waiting")  # a request still waiting on its job
    clock.now += 2.5  # five intervals without a report
    assert a.limit() == low
    a.leave("waiting")
    clock.now += 1.5
    assert _admitted(a) == 8


def test_a_zero_target_turns_the_wait_check_off():
    a, clock = _waits(target=0.0, max_in_flight=8)
    for _ in range(5):
        _interval(a, clock, [10.0])
    assert _admitted(a) == 8


def test_past_half_the_queue_the_customer_sending_most_of_the_work_is_refused_first():
    depth = {"now": 0}
    a = Admission(max_in_flight=12, customer_share=0.5, max_queue_depth=10, queue_depth=lambda: depth["now"])
    for _ in range(20):
        a.enter("flood")
        a.leave("flood")
    a.enter("quiet")
    a.leave("quiet")
    depth["now"] = 5  # half full: the flood (20 of 21 recent admissions) waits, the quiet customer does not
    assert _refusal(a, "flood") == (429, "customer_over_share")
    assert _refusal(a, "quiet") is None
    a.leave("quiet")
    depth["now"] = 4  # below half: everyone again
    assert _refusal(a, "flood") is None


def test_a_customer_asking_no_more_than_its_slots_a_second_is_never_most_of_the_work():
    """A flood whose clients sleep out their refusals (Retry-After: 1) asks this process a few times a
    second while the rest of it, on another process's connections, keeps the queue past half: the quiet
    customer's 2-5 requests a second were then "most of the work" and refused (7 of 40 in
    bench_async_flood's run). Past its slots' worth a second (6 here) the share counts again."""
    a = Admission(max_in_flight=12, customer_share=0.5, max_queue_depth=10, queue_depth=lambda: 8)
    for _ in range(2):
        assert _refusal(a, "flood") is None  # alone, then 2 of 2 but no more than its slots' worth
        a.leave("flood")
    for _ in range(6):  # up to 6 of 8 requests: most of them, but its slots' worth; the 7th is past it
        assert _refusal(a, "quiet") is None
        a.leave("quiet")
    assert _refusal(a, "quiet") == (429, "customer_over_share")


def test_an_instant_before_the_window_weighs_the_older_bucket_at_most_whole():
    """A request's instant is taken before it waits at the depth bound (up to the line's wait), and another
    thread may roll the window meanwhile: the older bucket was weighted past 1 (1.05 here)."""
    recent = admission_module._RecentRequests(window=1.0)  # noqa: SLF001
    start = recent._start  # noqa: SLF001
    recent.add("a", start + 0.5)
    recent.add("b", start + 1.2)  # the window rolls: a in the older bucket, b in the current one
    assert recent.share("b", start + 0.95) == (1.0, 0.5, True)


def test_alone_a_customer_may_fill_the_queue_to_the_bound():
    a = Admission(max_in_flight=100, customer_share=0.5, max_queue_depth=10, queue_depth=lambda: 8)
    for _ in range(5):
        assert _refusal(a, "only") is None  # no one else to protect: only the hard bound applies
        a.leave("only")


class _Reading:
    """A queue probe's reading for an Admission: its depth, its time, and a wait for a newer one."""

    def __init__(self, depth: int) -> None:
        self.depth, self.at = depth, 0.0
        self._newer = threading.Condition()

    def read(self, depth: int) -> None:
        """A reading that began now (a queue probe's time: Admission compares it with its publishes')."""
        with self._newer:
            self.depth, self.at = depth, time.monotonic()
            self._newer.notify_all()

    def wait_newer(self, than: float, timeout: float) -> None:
        with self._newer:
            self._newer.wait_for(lambda: self.at != than, timeout)

    def admission(self, *, max_depth: int = 5, line_wait: float = 0.0, max_in_flight: int = 100) -> Admission:
        return Admission(max_in_flight=max_in_flight, customer_share=0.5, max_queue_depth=max_depth,
                         line_wait=line_wait, queue_depth=lambda: self.depth, depth_read_at=lambda: self.at,
                         depth_wait=self.wait_newer)


def test_between_readings_the_depth_counts_what_this_process_admitted():
    """An asynchronous request gives its slot back at its 202, so between two readings of the queue a
    flood was admitted at the API's own pace: a bound of 25 read 146-171 jobs waiting (the load review).
    Each job published since the reading began is counted on top of it, until a newer reading."""
    reading = _Reading(depth=2)
    a = reading.admission(max_depth=5)
    for _ in range(3):
        assert _refusal(a, "only") is None
        a.published()
        a.leave("only", published=True)
    assert _refusal(a, "only") == (503, "queue_full")  # 2 read + 3 published since
    reading.read(4)  # the workers took some: a newer reading, and nothing published since
    assert _refusal(a, "only") is None
    a.published()
    a.leave("only", published=True)
    assert _refusal(a, "only") == (503, "queue_full")


def test_a_job_admitted_before_a_reading_and_published_after_it_stays_counted():
    """Admission comes before the body is read: a job admitted before a reading and still uploading
    when it came was in neither that reading nor the count (it counted what was admitted since the
    reading), and a flood of slow uploads got past the bound. It counts from its admission until a
    reading that began after its publish; a request that makes no job (refused after admission, an
    idempotent replay) stops counting when it leaves."""
    reading = _Reading(depth=0)
    a = reading.admission(max_depth=3)
    for _ in range(3):
        assert _refusal(a, "only") is None
    reading.read(0)  # the three are still uploading: not in the queue yet
    assert _refusal(a, "other") == (503, "queue_full")
    a.published()
    a.leave("only", published=True)  # one job in the queue, two uploads still on their way
    reading.read(1)
    assert _refusal(a, "other") == (503, "queue_full")
    a.leave("only")  # an upload refused after admission (a corrupt image, say): no job
    a.leave("only")
    assert _refusal(a, "other") is None  # 1 read + 1 admitted
    assert _refusal(a, "other") is None  # + 1
    assert _refusal(a, "other") == (503, "queue_full")


def test_with_no_new_reading_the_jobs_published_since_are_kept_only_up_to_the_bound():
    """Pruned at each new reading: a probe stuck while publishes went through kept one entry per job."""
    reading = _Reading(depth=0)
    a = reading.admission(max_depth=5, max_in_flight=1000)
    reading.depth = None  # stale: the depth is unknown, and requests are admitted
    for _ in range(200):
        a.enter("only")
        a.published()
        a.leave("only", published=True)
    assert len(a._published_at) == 5  # noqa: SLF001
    reading.depth = 0  # the same old reading again
    assert _refusal(a, "other") == (503, "queue_full")


def test_at_the_bound_a_request_waits_for_the_next_reading_before_it_is_refused():
    """The bound is ~0.25 s of the workers' work and a refusal's Retry-After a second: refused at once,
    clients that honour it slept while the queue ran dry. A request at the bound waits (up to the line's
    wait) for the probe's next reading, and is admitted if that one has room."""
    reading = _Reading(depth=5)
    a = reading.admission(max_depth=5, line_wait=5.0)
    threading.Timer(0.05, reading.read, args=(1,)).start()
    assert _refusal(a, "only") is None
    a.leave("only")
    reading.read(5)
    waiting = reading.admission(max_depth=5, line_wait=0.05)  # full, and no newer reading comes
    assert _refusal(waiting, "only") == (503, "queue_full")
    assert waiting._depth_waiters == 0  # noqa: SLF001


def test_a_flood_waiting_at_the_bound_holds_at_most_its_share_of_the_places_to_wait():
    """Requests waiting at the depth bound hold threads: counted only against the process's bound, a
    flood could take every place to wait, and a quiet customer arriving then was refused at once. They
    count against their customer's slots too (6 of 12 here)."""
    reading = _Reading(depth=5)
    a = reading.admission(max_depth=5, line_wait=5.0, max_in_flight=12)
    answers: list[tuple[int, str] | None] = []
    quiet_answer: list[tuple[int, str] | None] = []
    flood = [threading.Thread(target=lambda: answers.append(_refusal(a, "flood"))) for _ in range(6)]
    for thread in flood:
        thread.start()
    deadline = time.monotonic() + 5
    while a._depth_waiters < 6:  # noqa: SLF001
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert _refusal(a, "flood") == (503, "queue_full")  # its share of the places is taken: not a 7th
    quiet = threading.Thread(target=lambda: quiet_answer.append(_refusal(a, "quiet")))
    quiet.start()
    while a._depth_waiters < 7:  # noqa: SLF001 (the quiet customer waits too: room was left for it)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    reading.read(0)
    for thread in [*flood, quiet]:
        thread.join(5)
    assert quiet_answer == [None] and a._depth_waiters == 0  # noqa: SLF001
    # The flood's, once there is room: admitted, or past half the bound its share of the requests
    # refused (the queue it filled again).
    assert len(answers) == 6 and set(answers) <= {None, (429, "customer_over_share")}, answers


def test_a_flood_held_back_at_the_bound_does_not_make_a_quiet_customer_most_of_the_work():
    """The share past half the bound counts requests, admitted or not: counting admissions, a flood
    refused at the bound left a quiet customer's one admission as most of the work (429 to the quiet
    one), and a quiet customer refused at the bound was no one to protect."""
    reading = _Reading(depth=5)
    a = reading.admission(max_depth=5, max_in_flight=12)
    for _ in range(20):
        assert _refusal(a, "flood") == (503, "queue_full")
    reading.read(3)  # past half the bound
    assert _refusal(a, "quiet") is None
    assert _refusal(a, "flood") == (429, "customer_over_share")


def test_the_line_s_wait_bounds_the_depth_wait_and_the_line_together(monkeypatch):
    """The line's wait (0.1 s) bounds a request's whole wait for admission: at 0.2 s the admitted requests'
    p99 left the SLO (ADR 0007). A request that waited at the depth bound for a reading, then found the
    in-flight limit taken, stood in the line for a whole line's wait more."""
    timeouts: list[float] = []

    class RecordingEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            timeouts.append(timeout if timeout is not None else float("inf"))
            return super().wait(0)  # nobody gives a slot back: refused once the wait is over

    class RecordingWaiter(admission_module._Waiter):  # noqa: SLF001
        __slots__ = ()

        def __init__(self, customer_id: str) -> None:
            super().__init__(customer_id)
            self.event = RecordingEvent()

    monkeypatch.setattr(admission_module, "_Waiter", RecordingWaiter)
    reading = _Reading(depth=0)

    def slow_reading(than: float, timeout: float) -> None:
        time.sleep(0.06)  # the probe's next reading comes after 60 ms of the line's 100
        reading.read(0)

    clock = FakeClock()
    a = Admission(max_in_flight=8, customer_share=1.0, max_queue_depth=5, queue_depth=lambda: reading.depth,
                  depth_read_at=lambda: reading.at, depth_wait=slow_reading, target_queue_wait=0.25,
                  queue_wait_interval=0.5, line_wait=0.1, clock=clock)
    while a.limit() > 2:
        _interval(a, clock, [5.0])
    a.enter("x")
    a.enter("x")  # the wait-driven limit's two slots
    reading.read(5)  # the queue at its bound
    assert _refusal(a, "late") == (503, "queue_full")
    assert len(timeouts) == 1 and timeouts[0] <= 0.1 - 0.06, timeouts  # the rest of the 0.1 s, not 0.1 more
    assert a.in_line == 0 and a.in_flight == 2 and a._depth_waiters == 0  # noqa: SLF001


# --- the probe, on the real broker -----------------------------------------------------------------

def test_the_probe_reads_a_queues_depth_off_the_request_path_and_goes_stale_without_a_broker():
    from controlplane.celery import app

    name = f"test.probe.{uuid.uuid4().hex[:8]}"
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue = Queue(name, queue_arguments={"x-queue-type": "quorum"}).bind(channel)
        queue.declare()
        try:
            producer = Producer(channel)
            for i in range(3):
                producer.publish({"n": i}, routing_key=name)
            probe = QueueProbe((name, f"{name}.missing"), app.connection_for_read, interval=0.1)
            deadline = time.monotonic() + 10
            while probe.ready(name) != 3:
                assert time.monotonic() < deadline, probe.values()
                time.sleep(0.05)
            assert probe.values() == {name: (3, 0)}  # a queue that does not exist is simply absent
            producer.publish({"n": 3}, routing_key=name)
            deadline = time.monotonic() + 5
            while probe.ready(name) != 4:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            queue.delete()

    # Asked for a newer reading (a request waiting at the depth bound), a probe whose interval is far off
    # reads at once: the 4th message is seen long before the next scheduled probe.
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue = Queue(name, queue_arguments={"x-queue-type": "quorum"}).bind(channel)
        queue.declare()
        try:
            probe = QueueProbe((name,), app.connection_for_read, interval=60)
            try:
                assert probe.first.wait(10) and probe.ready(name) == 0
                Producer(channel).publish({"n": 0}, routing_key=name)
                deadline = time.monotonic() + 5  # RabbitMQ counts the message within a moment
                while probe.ready(name) != 1:
                    assert time.monotonic() < deadline, probe.values()
                    probe.wait_newer(probe.read_at, 1.0)
            finally:
                probe.stop()
        finally:
            queue.delete()

    connecting_threads = []

    def unreachable() -> Connection:
        connecting_threads.append(threading.current_thread())
        return Connection(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1)

    nowhere = QueueProbe((name,), unreachable, interval=0.1, stale_after=0.5)
    assert nowhere.first.wait(10)
    assert nowhere.values() is None and nowhere.ready(name) is None
    # A reader never waits on the broker: only the probe's own thread ever connects.
    assert connecting_threads and threading.current_thread() not in connecting_threads


def test_a_stale_probe_asked_for_fresh_values_tries_again_at_once():
    """/readyz asks for fresh values: a probe waiting out its backoff after a failure tries again at
    once, so a broker that is back is seen when asked about, not up to 7.5 s later (the backoff here
    is 15-45 s, the wait 10 s)."""
    from controlplane.celery import app

    broker_back = threading.Event()

    def connect() -> Connection:
        if broker_back.is_set():
            return app.connection_for_read()
        return Connection(f"amqp://guest:guest@127.0.0.1:{free_port()}//", connect_timeout=1)

    probe = QueueProbe((f"test.probe.fresh.{uuid.uuid4().hex[:8]}",), connect, interval=30, stale_after=60)
    try:
        assert probe.first.wait(10) and probe.values() is None
        broker_back.set()
        assert probe.fresh(timeout=10) == {}  # the broker answered (the queue does not exist)
    finally:
        probe.stop()


def test_probing_a_missing_queue_keeps_one_channel_and_the_connections_beat():
    """A 404 closes the probe's channel and py-amqp reopens that same channel: the probe opened
    another as well, leaking one per probe (2 a second per API process until channel_max). The probe's
    and the reply waiter's connections heartbeat (Celery's read connections default to none)."""
    from controlplane.admission import probe_connection
    from controlplane.celery import app
    from resizer.notify import reply_connection

    made, done = [], threading.Event()

    def connect():
        if done.is_set():
            raise ConnectionError("test over")
        made.append(app.connection_for_read(heartbeat=app.conf.broker_heartbeat))
        return made[-1]

    probe = QueueProbe((f"test.probe.missing.{uuid.uuid4().hex[:8]}",), connect, interval=0.02)
    try:
        assert probe.first.wait(10)
        time.sleep(1.0)  # some 50 probes of a queue that does not exist
        assert len(made) == 1 and len(made[0].connection.channels) <= 2  # channel 0 and the probe's
    finally:
        done.set()
        made[0].release()
    with reply_connection() as connection:
        assert connection.heartbeat == app.conf.broker_heartbeat > 0
    with probe_connection() as connection:
        assert connection.heartbeat == app.conf.broker_heartbeat


# --- the view ----------------------------------------------------------------------------------------

@pytest.fixture
def tight_admission(monkeypatch):
    """This process's admission with two slots, one per customer, and a depth the test sets."""
    depth: dict[str, int | None] = {"now": None}
    a = Admission(max_in_flight=2, customer_share=0.5, max_queue_depth=10, queue_depth=lambda: depth["now"])
    monkeypatch.setattr(admission_module, "admission", lambda: a)
    return a, depth


def test_the_view_answers_each_refusal_as_a_problem_with_retry_after(api, customer_key, tight_admission):
    a, depth = tight_admission
    image = corpus("coffee.jpg")
    customer_id = str(customer_key[0].id)

    a.enter(customer_id)  # this customer already has its one slot
    response = api.post("/v1/resize?width=50", data=image, content_type="image/jpeg")
    assert response.status_code == 429 and response.json()["code"] == "customer_over_share"
    assert response["Retry-After"] == "1" and response["Content-Type"] == "application/problem+json"

    a.leave(customer_id)
    a.enter("someone-else")
    a.enter("a-third")  # two other customers hold both slots: the process is full
    response = api.post("/v1/resize?width=50", data=image, content_type="image/jpeg")
    assert response.status_code == 503 and response.json()["code"] == "overloaded" and response["Retry-After"]
    a.leave("someone-else")
    a.leave("a-third")

    depth["now"] = 10
    response = api.post("/v1/resize?width=50", data=image, content_type="image/jpeg")
    assert response.status_code == 503 and response.json()["code"] == "queue_full" and response["Retry-After"]
    assert a.in_flight == 0  # refusals hold nothing


def test_an_admitted_request_gives_its_slot_back_whatever_its_answer(api, tight_admission, worker):
    a, _ = tight_admission
    assert api.post("/v1/resize?width=50", data=corpus("coffee.jpg"), content_type="image/jpeg").status_code == 200
    assert api.post("/v1/resize?width=50", data=b"not an image", content_type="image/jpeg").status_code == 415
    assert api.post("/v1/resize?width=50", data=b"", content_type="image/jpeg").status_code == 400
    assert a.in_flight == 0


def test_default_bounds_leave_threads_free_and_give_no_customer_more_than_half():
    assert 1 <= settings.ADMISSION_MAX_IN_FLIGHT < 16
    assert settings.ADMISSION_CUSTOMER_SHARE == 0.5
    assert settings.ADMISSION_MAX_QUEUE_DEPTH > 0 and settings.ADMISSION_QUEUE_PROBE_SECONDS <= 1


# --- the admission line: at the wait-driven limit, a short FIFO wait for the next slot given back ---

def _lined(max_in_flight: int = 8, line_wait: float = 30.0) -> tuple[Admission, FakeClock]:
    """Admission whose wait-driven limit is cut to 2 (standing intervals) and taken, with a line."""
    clock = FakeClock()
    a = Admission(max_in_flight=max_in_flight, customer_share=1.0, max_queue_depth=0, queue_depth=lambda: None,
                  target_queue_wait=0.25, queue_wait_interval=0.5, line_wait=line_wait, clock=clock)
    while a.limit() > 2:
        _interval(a, clock, [5.0])
    a.enter("x")
    a.enter("x")
    assert a.in_flight == 2 == a.limit()
    return a, clock


def _enter_in_thread(a: Admission, customer: str, outcomes: list) -> threading.Thread:
    def go() -> None:
        try:
            a.enter(customer)
            outcomes.append(customer)
        except Refused as e:
            outcomes.append((customer, e.status, e.code))

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def _until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_at_the_limit_requests_wait_in_line_and_get_the_slots_given_back_in_their_order():
    """Before the line each of these was a 503 and a second's wait for its client, then a new draw
    against every newcomer: past the knee some images were refused again and again."""
    a, _ = _lined()
    outcomes: list = []
    threads = []
    for n, name in enumerate(("first", "second", "third"), start=1):
        threads.append(_enter_in_thread(a, name, outcomes))
        _until(lambda n=n: a.in_line == n)
    assert outcomes == [] and a.in_flight == 2
    a.leave("x")
    threads[0].join(10)
    assert outcomes == ["first"] and a.in_line == 2 and a.in_flight == 2
    a.leave("x")
    threads[1].join(10)
    assert outcomes == ["first", "second"] and a.in_line == 1
    a.leave("first")
    threads[2].join(10)
    assert outcomes == ["first", "second", "third"] and a.in_line == 0 and a.in_flight == 2


def test_a_newcomer_does_not_pass_the_line_when_the_limit_grows():
    a, clock = _lined()
    outcomes: list = []
    waiting = _enter_in_thread(a, "waiting", outcomes)
    _until(lambda: a.in_line == 1)
    _interval(a, clock, [0.01])  # a job started in time: the limit grows by one
    late = _enter_in_thread(a, "late", outcomes)
    waiting.join(10)
    _until(lambda: a.in_line == 1)  # the newcomer stands behind, the slot went to the one waiting
    assert outcomes == ["waiting"] and a.in_flight == 3
    a.leave("x")
    late.join(10)
    assert outcomes == ["waiting", "late"]


def test_the_line_is_bounded_by_the_static_bound_and_its_wait():
    a, _ = _lined(max_in_flight=4, line_wait=30.0)
    outcomes: list = []
    threads = [_enter_in_thread(a, f"w{i}", outcomes) for i in range(2)]
    _until(lambda: a.in_line == 2)
    # In flight and in line together reach the static bound (the threads kept free stay free): refused at once.
    assert _refusal(a, "one-more") == (503, "queue_full")
    for _ in range(2):
        a.leave("x")
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["w0", "w1"]

    short, _ = _lined(line_wait=0.05)
    assert _refusal(short, "impatient") == (503, "queue_full")  # nobody gave a slot back in time
    assert short.in_line == 0 and short.in_flight == 2
    short.leave("x")
    assert _refusal(short, "impatient") is None  # its place in line was given up, nothing held


def test_requests_in_line_count_against_their_customers_share():
    clock = FakeClock()
    a = Admission(max_in_flight=8, customer_share=0.5, max_queue_depth=0, queue_depth=lambda: None,
                  target_queue_wait=0.25, queue_wait_interval=0.5, line_wait=30.0, clock=clock)
    while a.limit() > 2:
        _interval(a, clock, [5.0])
    assert a.customer_slots == 4
    a.enter("greedy")
    a.enter("greedy")  # the limit's two slots
    outcomes: list = []
    threads = [_enter_in_thread(a, "greedy", outcomes) for _ in range(2)]
    _until(lambda: a.in_line == 2)
    assert _refusal(a, "greedy") == (429, "customer_over_share")  # 2 in flight + 2 in line: its 4
    for _ in range(2):
        a.leave("greedy")
    for thread in threads:
        thread.join(10)
    assert outcomes == ["greedy", "greedy"] and a.in_flight == 2


def test_without_a_line_the_limit_refuses_at_once():
    clock = FakeClock()
    a = Admission(max_in_flight=8, customer_share=1.0, max_queue_depth=0, queue_depth=lambda: None,
                  target_queue_wait=0.25, queue_wait_interval=0.5, clock=clock)
    while a.limit() > 2:
        _interval(a, clock, [5.0])
    a.enter("x")
    a.enter("x")
    assert _refusal(a, "y") == (503, "queue_full") and a.in_line == 0
