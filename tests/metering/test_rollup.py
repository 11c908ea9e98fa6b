"""The rollup recomputes whole windows: right sums per hour and day, nothing new when run twice or
concurrently, late records land in their own (old) window."""
from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from django.db import connection

from metering import services
from metering.models import UsageRollup
from tests.metering.conftest import insert, usage

pytestmark = pytest.mark.django_db

# A fixed hour two days ago, well inside the window the rollup still recomputes.
T0 = (datetime.now(timezone.utc) - timedelta(days=2)).replace(hour=10, minute=0, second=0, microsecond=0)


def windows(customer_id, granularity: str = "hour") -> dict[datetime, UsageRollup]:
    return {w.window_start: w for w in UsageRollup.objects.filter(customer_id=customer_id, granularity=granularity)}


def snapshot(customer_id) -> list[dict]:
    return list(UsageRollup.objects.filter(customer_id=customer_id).order_by("granularity", "window_start").values())


def test_each_axis_is_summed_per_hour_and_per_day():
    customer = uuid.uuid4()
    insert(usage(customer, at=T0 + timedelta(minutes=10)),
           usage(customer, at=T0 + timedelta(minutes=20), input_bytes=1000, cpu_seconds="0.5"),
           usage(customer, at=T0 + timedelta(minutes=70)),
           usage(customer, at=T0 + timedelta(minutes=5), outcome="failed"))
    services.usage_rollup()
    hours = windows(customer)
    assert set(hours) == {T0, T0 + timedelta(hours=1)}
    first = hours[T0]
    assert (first.images, first.failed_images, first.input_bytes) == (2, 1, 251_000)
    assert (first.cpu_seconds, first.output_megapixels, first.input_megapixels) == (
        Decimal("0.507"), Decimal("0.04"), Decimal("1.0"))
    day = windows(customer, "day")[T0.replace(hour=0)]
    assert (day.images, day.failed_images, day.input_bytes, day.output_bytes) == (3, 1, 501_000, 27_000)


def test_a_second_run_changes_nothing():
    customer = uuid.uuid4()
    insert(*[usage(customer, at=T0 + timedelta(minutes=i * 7)) for i in range(20)])
    services.usage_rollup()
    before = snapshot(customer)
    services.usage_rollup()
    assert snapshot(customer) == before  # same numbers, and updated_at untouched


def test_a_late_record_is_added_to_its_own_window_only():
    customer = uuid.uuid4()
    insert(usage(customer, at=T0 + timedelta(minutes=1)))
    services.usage_rollup()
    on_time = snapshot(customer)
    # A record of a day earlier, received now (a spool shipped after a long outage).
    insert(usage(customer, at=T0 - timedelta(hours=26)))
    services.usage_rollup()
    assert windows(customer)[T0 - timedelta(hours=26)].images == 1
    assert windows(customer, "day")[(T0 - timedelta(days=1)).replace(hour=0)].images == 1
    assert [w for w in snapshot(customer) if w["window_start"] >= T0.replace(hour=0)] == on_time


def test_records_older_than_the_archive_horizon_are_not_rolled_up_and_said_so(settings, caplog):
    """They were dropped in silence: now logged and counted in the run's result."""
    customer = uuid.uuid4()
    insert(usage(customer, at=datetime.now(timezone.utc) - timedelta(days=settings.METERING_ARCHIVE_AFTER_DAYS)))
    result = services.usage_rollup()
    assert not snapshot(customer)
    assert result["too_old"] == 1 and "arrived after the rollup horizon" in caplog.text


@pytest.mark.parametrize("env", [{"METERING_ARCHIVE_AFTER_DAYS": "35"},
                                 {"BILLING_GRACE_DAYS": "30"}])
def test_settings_refuse_an_archive_age_that_would_leave_a_period_unrolled(env):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", "import controlplane.settings"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env})
    assert proc.returncode != 0 and "must exceed 31 + BILLING_GRACE_DAYS + 1" in proc.stderr


@pytest.mark.django_db(transaction=True)
def test_concurrent_runs_agree_with_one_run():
    customers = [uuid.uuid4() for _ in range(5)]
    insert(*[usage(c, at=T0 + timedelta(minutes=i)) for c in customers for i in range(0, 300, 3)])
    errors = []

    def run() -> None:
        try:
            services.usage_rollup()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    after_concurrent = [snapshot(c) for c in customers]
    services.usage_rollup()
    assert [snapshot(c) for c in customers] == after_concurrent
    for c in customers:
        assert sum(w.images for w in windows(c).values()) == 100
        assert sum(w.images for w in windows(c, "day").values()) == 100


def test_beat_tasks_have_their_own_time_limits_not_a_resize_s():
    """The worker applies a task's own limits when its message carries none (beat's do not): the
    rollup, billing run, archive and sweep must not inherit the 20 s / 30 s of a resize, which would
    cut (and roll back) a month's billing run every time it ran."""
    import celeryconfig
    import metering.tasks  # noqa: F401  (registers the tasks, as a worker's imports do)
    import resizer.tasks  # noqa: F401
    from controlplane.celery import app

    for name in ("metering.tasks.usage_rollup", "metering.tasks.billing_run", "metering.tasks.usage_archive",
                 "resizer.tasks.staging_sweep"):
        task = app.tasks[name]
        assert (task.soft_time_limit, task.time_limit) == (
            celeryconfig.PERIODIC_TASK_SOFT_TIME_LIMIT, celeryconfig.PERIODIC_TASK_TIME_LIMIT), name
        assert task.time_limit > celeryconfig.task_time_limit
    resize = app.tasks["resizer.tasks.resize"]
    assert resize.time_limit in (None, celeryconfig.task_time_limit)  # None: the worker's configured default


def test_beat_tasks_go_to_their_own_queue_and_expire_with_their_interval():
    """On the resize queue beat's messages counted in the depth admission refuses on, and piled up
    while no worker ran (then each took a resize child at once)."""
    import celeryconfig
    import metering.tasks  # noqa: F401
    import resizer.tasks  # noqa: F401
    from controlplane.celery import app

    router = app.amqp.router
    for entry in celeryconfig.beat_schedule.values():
        route = router.route(entry.get("options", {}), entry["task"])
        assert route["queue"].name == celeryconfig.periodic_queue.name, entry["task"]
        assert entry["options"]["expires"] == entry["schedule"]
    resize = router.route({}, "resizer.tasks.resize")
    assert resize["queue"].name == celeryconfig.resize_queue.name
    # The resize queue's binding does not take beat's routing keys (both are on one topic exchange).
    assert not celeryconfig.periodic_queue.routing_key.startswith(celeryconfig.RESIZE_QUEUE)


@pytest.mark.django_db(transaction=True)
def test_a_run_waits_for_the_one_before_it_only_so_long_then_skips(settings):
    """Each run waited for the lock without bound: while a long billing run held it, every rollup beat
    sent (one a minute) took a worker process away from resizing until its 25-minute time limit."""
    import psycopg

    settings.METERING_LOCK_WAIT_SECONDS = 0.3
    results: dict[str, dict] = {}
    with psycopg.connect(services.staging_conninfo(), autocommit=False) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", [services.AGGREGATION_LOCK])  # a run in progress

        def run(name: str, fn) -> None:
            try:
                results[name] = fn()
            finally:
                connection.close()

        threads = [threading.Thread(target=run, args=("rollup", services.usage_rollup), daemon=True),
                   threading.Thread(target=run, args=("billing", services.billing_run), daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        still_waiting = [t for t in threads if t.is_alive()]
        holder.rollback()  # the run in progress ends (and lets a thread still waiting finish)
    assert not still_waiting
    assert set(results) == {"rollup", "billing"} and all("skipped" in r for r in results.values()), results
    assert "hours" in services.usage_rollup()  # with the lock free, a run runs


def test_beats_messages_carry_no_time_limits_so_the_workers_own_apply(monkeypatch):
    """apply_async copied the task's limits, as beat's environment computed them, into the message,
    and the worker obeys a message's limits over its own PERIODIC_TASK_* settings."""
    import celeryconfig
    import metering.tasks  # noqa: F401
    import resizer.tasks  # noqa: F401
    from controlplane.celery import app

    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, *args, **options: sent.append(
        (name, options.get("time_limit"), options.get("soft_time_limit"))))
    for entry in celeryconfig.beat_schedule.values():
        app.tasks[entry["task"]].apply_async(**entry["options"])
        assert app.tasks[entry["task"]].time_limit == celeryconfig.PERIODIC_TASK_TIME_LIMIT, entry["task"]
    assert len(sent) == len(celeryconfig.beat_schedule)
    assert all(limits == [None, None] for _, *limits in sent), sent
