"""The API tier's Prometheus metrics and the one /metrics that sums every process of a server.

What is measured here, and why (docs/OPERATIONS.md has what to watch; docs/adr/0005 the numbers):
- every POST /v1/resize: its duration (a bucket at the 0.5 s SLO), its outcome (yield = served /
  (served + shed + error)) and, when refused for capacity or plan limits, why (admissions shed);
- the stages of a resize as the code names them: edge, auth, line, upload, admission, staging, enqueue, queue_wait,
  processing, result_return;
- at scrape time, shared state no request touches: the resize queue's depth and consumers (a
  passive declare on the broker), the oldest usage record not yet shipped (the metering spool),
  the age of the oldest identity snapshot among this server's processes, and how long ago beat's
  metering jobs (rollup, billing, archive) last succeeded (one query of their watermark rows).

Under gunicorn every process writes its values to PROMETHEUS_MULTIPROC_DIR (controlplane/metrics_dir.py)
and /metrics sums them; in one process (tests, runserver) the default registry serves. No label
ever carries a customer id: labels are outcomes, stages and error codes, all bounded sets.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import prometheus_client
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django_prometheus.middleware import PrometheusAfterMiddleware, PrometheusBeforeMiddleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric

from resizer.jobs import Job, parse_time

log = logging.getLogger("controlplane.access")

# Request latency: fine around the 0.5 s SLO (p99 for inputs under 1 MB), coarse past it.
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# A stage is a slice of a request: from half a millisecond (auth from memory) to the sync wait.
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The SLO covers images under 1 MB; larger inputs are measured under their own label.
SLO_INPUT_BYTES = 1_000_000

RESIZE_REQUEST_SECONDS = Histogram(
    "resizer_resize_request_duration_seconds",
    "POST /v1/resize, from the request's arrival at the load balancer (its X-Request-Start; at Django "
    "without one) to its response, by outcome and input size.",
    ["outcome", "input_size"], buckets=REQUEST_BUCKETS,
)
RESIZE_REQUESTS = Counter(
    "resizer_resize_requests", "POST /v1/resize answers by outcome and stable code (ok, accepted, or the error code).",
    ["outcome", "code"],
)
STAGE_SECONDS = Histogram(
    "resizer_resize_stage_duration_seconds",
    "Time a resize request spent in each stage: edge (from the load balancer's X-Request-Start to Django: "
    "its queue and gunicorn's), auth, line (admission control, waiting in its line), upload, "
    "admission, staging, enqueue, queue_wait, processing, result_return.",
    ["stage"], buckets=STAGE_BUCKETS,
)
STAGE_CPU_SECONDS = Counter(
    "resizer_resize_stage_cpu_seconds",
    "CPU time of the request's own thread in each stage of POST /v1/resize: auth, line, upload, admission, "
    "staging, enqueue, and respond (waiting for the result and building the answer). What the API tier "
    "costs per request beyond this is gunicorn's and Django's (and the reply-queue thread's).",
    ["stage"],
)
ADMISSION_LIMIT = Gauge(
    "resizer_admission_in_flight_limit",
    "Resizes this server's API processes admit at once: the sum over live processes of each one's "
    "limit (sampled every 5 s), which follows the queue wait below ADMISSION_MAX_IN_FLIGHT (ADR 0007).",
    multiprocess_mode="livesum",
)
ADMISSIONS_SHED = Counter(
    "resizer_admissions_shed",
    "Resize requests refused with 429 (plan limits) or 503 (overload before any work, or a dependency away, "
    "some after the upload was read), by code.",
    ["reason"],
)
STAFF_LOGINS = Counter(
    "resizer_staff_logins",
    "Staff password checks (Basic on the management API, the admin's login form) by how they ended: "
    "succeeded, failed, or throttled (refused before any check, past a cap of failed logins).",
    ["via", "outcome"],
)
AUTH_SYNCED_NAME = "resizer_auth_snapshot_synced_timestamp_seconds"
AUTH_AGE_NAME = "resizer_auth_snapshot_age_seconds"

OUTCOMES = ("served", "client_error", "limited", "shed", "error")
_CODE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def outcome_of(status: int) -> str:
    """served: 2xx (an image, or 202 for a job accepted); limited: 429 (the customer's plan);
    shed: 503 (a dependency away, or overload); error: other 5xx; client_error: other 4xx."""
    if status < 400:
        return "served"
    if status == 429:
        return "limited"
    if status == 503:
        return "shed"
    if status >= 500:
        return "error"
    return "client_error"


# --- the stages of one request ------------------------------------------------------------------

class StageClock:
    """Laps through a request: each lap(stage) records the time since the previous lap, and the CPU
    time this thread spent in it."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self._cpu = time.thread_time()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        STAGE_SECONDS.labels(stage).observe(now - self._last)
        self._last = now
        self.cpu_lap(stage)

    def cpu_lap(self, stage: str) -> None:
        """Only the CPU time since the previous lap (for stages whose wall time is timed elsewhere)."""
        cpu = time.thread_time()
        STAGE_CPU_SECONDS.labels(stage).inc(cpu - self._cpu)
        self._cpu = cpu



def job_stages_observe(job: Job, published: float) -> float | None:
    """The stages the job document timed (wall clocks of the API and worker hosts): queue_wait
    (`published`, the API's wall time when the broker confirmed the message -> started), processing
    (started -> finished), result_return (finished -> now). Returns the queue wait in seconds (None
    when the document lacks it). Until 2026-11-22 the queue wait ran from the document's creation,
    before the input was staged and the message published: a broker slow to confirm showed as queue
    wait, and admission control (ADR 0007), which follows it, shed `queue_full` with idle workers."""
    started, finished = parse_time(job.started_at), parse_time(job.finished_at)
    queue_wait = max(0.0, started.timestamp() - published) if started else None
    if queue_wait is not None:
        STAGE_SECONDS.labels("queue_wait").observe(queue_wait)
    if started and finished:
        STAGE_SECONDS.labels("processing").observe(max(0.0, (finished - started).total_seconds()))
    if finished:
        STAGE_SECONDS.labels("result_return").observe(
            max(0.0, (datetime.now(timezone.utc) - finished).total_seconds()))
    return queue_wait


# --- every resize request's duration and outcome ------------------------------------------------

def _problem_code(response: HttpResponse) -> str:
    try:
        code = json.loads(response.content).get("code", "")
    except (ValueError, AttributeError):
        code = ""
    return code if isinstance(code, str) and _CODE.match(code) else "other"


# --- django-prometheus's request metrics, for every view but the hot one --------------------------
# POST /v1/resize has its own (resizer_resize_*, above and below); skipping django-prometheus's
# labelled samples there saves ~190 of the ~1,800 Python calls of a refused resize (cProfile count,
# docs/BENCHMARKS.md), on the path whose CPU the API tier's budget is about.

@functools.cache
def _resize_path() -> str:
    return reverse("resize")


def _resize_path_request(request: HttpRequest) -> bool:
    """A request to /v1/resize, known before URL resolution (so the middlewares before it can tell)."""
    return request.path_info == _resize_path()


class DjangoMetricsBeforeMiddleware(PrometheusBeforeMiddleware):
    def process_request(self, request):  # type: ignore[no-untyped-def]
        return None if _resize_path_request(request) else super().process_request(request)

    def process_response(self, request, response):  # type: ignore[no-untyped-def]
        return response if _resize_path_request(request) else super().process_response(request, response)


class DjangoMetricsAfterMiddleware(PrometheusAfterMiddleware):
    def process_request(self, request):  # type: ignore[no-untyped-def]
        return None if _resize_path_request(request) else super().process_request(request)

    def process_view(self, request, view_func, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if _resize_path_request(request) else super().process_view(request, view_func, *args, **kwargs)

    def process_template_response(self, request, response):  # type: ignore[no-untyped-def]
        return response if _resize_path_request(request) else super().process_template_response(request, response)

    def process_response(self, request, response):  # type: ignore[no-untyped-def]
        return response if _resize_path_request(request) else super().process_response(request, response)

    def process_exception(self, request, exception):  # type: ignore[no-untyped-def]
        return None if _resize_path_request(request) else super().process_exception(request, exception)


EDGE_WAIT_MAX_SECONDS = 60.0


def edge_wait(stamp: str | None, arrived: float) -> float | None:
    """Seconds from the load balancer's `X-Request-Start: t=<microseconds since the epoch>` (HAProxy
    sets it on every request, replacing any a client sent) to the request's arrival at Django: its
    wait in HAProxy's queue (maxconn), in gunicorn's accept backlog and for a free thread. Without it the
    SLO's histogram started at Django and missed exactly the waits of a saturated node (found by review:
    8 resizes on one thread took clients 0.12-0.59 s, all recorded under 0.1 s). None without a
    stamp or with a nonsense one; a stamp slightly ahead (the hosts' clocks differ) counts as 0."""
    if not stamp or not stamp.startswith("t="):
        return None
    try:
        waited = arrived - int(stamp[2:]) / 1e6
    except ValueError:
        return None
    if not -EDGE_WAIT_MAX_SECONDS <= waited <= EDGE_WAIT_MAX_SECONDS:
        return None
    return max(0.0, waited)


class ResizeMetricsMiddleware:
    """Times every POST /v1/resize and counts its outcome; logs one line per request."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        arrived, started = time.time(), time.perf_counter()
        response = self.get_response(request)
        if request.method != "POST" or not _resize_path_request(request):
            return response
        edge = edge_wait(request.META.get("HTTP_X_REQUEST_START"), arrived)
        if edge is not None:
            STAGE_SECONDS.labels("edge").observe(edge)
        elapsed = time.perf_counter() - started + (edge or 0.0)
        status = response.status_code
        outcome = outcome_of(status)
        code = ("accepted" if status == 202 else "ok") if status < 400 else _problem_code(response)
        input_bytes = getattr(request, "resize_input_bytes", None)
        if input_bytes is None:
            try:
                input_bytes = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                input_bytes = 0
        RESIZE_REQUEST_SECONDS.labels(outcome, "lt_1mb" if input_bytes < SLO_INPUT_BYTES else "ge_1mb").observe(elapsed)
        RESIZE_REQUESTS.labels(outcome, code).inc()
        if status in (429, 503):
            ADMISSIONS_SHED.labels(code).inc()
        location = response.get("Location", "")
        job_id = location.rsplit("/", 1)[-1] if location.startswith("/v1/jobs/") else None
        log.info("resize answered", extra={
            "status": status, "outcome": outcome, "code": code, "duration_ms": round(elapsed * 1000, 2),
            "edge_ms": None if edge is None else round(edge * 1000, 2),
            "input_bytes": input_bytes, "job_id": job_id,
        })
        return response


# --- the identity snapshot's age, per process ---------------------------------------------------

_auth_gauge: Gauge | None = None
_auth_gauge_lock = threading.Lock()


def _auth_synced_gauge() -> Gauge:
    """Created on first use, so only processes that authenticate (the API) export it."""
    global _auth_gauge
    with _auth_gauge_lock:
        if _auth_gauge is None:
            _auth_gauge = Gauge(AUTH_SYNCED_NAME, "When the oldest identity snapshot among this server's live "
                                "processes was last synced from Postgres (Unix time).",
                                multiprocess_mode="livemin")
        return _auth_gauge


def auth_snapshot_record() -> None:
    """Copy this process's snapshot time into its gauge. Never starts the cache: a process starts it
    on its first authenticated request (and one that never authenticated has no snapshot to age)."""
    from identity import dataplane

    cache = dataplane.credential_cache.if_made()
    if cache is not None and cache.synced_at is not None:
        _auth_synced_gauge().set(cache.synced_at)


def admission_limit_record() -> None:
    """This process's in-flight limit (the static bound until a request made its admission state)."""
    from controlplane import admission

    slots = admission.admission.if_made()
    ADMISSION_LIMIT.set(slots.limit() if slots is not None else settings.ADMISSION_MAX_IN_FLIGHT)


def process_gauges_start(interval: float = 5.0) -> None:
    """In each API process (gunicorn's post_worker_init): export the usual series at 0 from the start
    (a counter first seen at 5 hides its first 5 from rate()), keep the process's snapshot time
    current even when it serves nothing, so an idle process does not look stale, and sample its
    admission limit (off the request path)."""
    RESIZE_REQUEST_SECONDS.labels("served", "lt_1mb")
    for outcome, code in (("served", "ok"), ("served", "accepted"), ("shed", "queue_unavailable"),
                          ("shed", "staging_unavailable"), ("shed", "auth_unavailable"), ("shed", "overloaded"),
                          ("shed", "queue_full"), ("error", "internal_error"), ("error", "input_lost")):
        RESIZE_REQUESTS.labels(outcome, code)
        if outcome == "shed":
            ADMISSIONS_SHED.labels(code)
    for via in ("basic", "form"):
        for outcome in ("succeeded", "failed", "throttled"):
            STAFF_LOGINS.labels(via, outcome)

    def run() -> None:
        while True:
            for record in (auth_snapshot_record, admission_limit_record):
                try:
                    record()
                except Exception as e:  # never let metrics take a process down
                    logging.getLogger(__name__).debug("%s failed: %s", record.__name__, e)
            time.sleep(interval)

    threading.Thread(target=run, name="metrics-process-gauges", daemon=True).start()


class _WithAuthAge:
    """Passes a collector's families through and adds the oldest snapshot's age, derived at scrape
    time from the per-process sync times (so it keeps growing while nothing syncs)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        oldest: float | None = None
        for family in self.inner.collect():
            if family.name == AUTH_SYNCED_NAME:
                values = [s.value for s in family.samples if s.value > 0]
                oldest = min(values) if values else None
            yield family
        if oldest is not None:
            yield GaugeMetricFamily(AUTH_AGE_NAME, "Age of the oldest identity snapshot among this server's "
                                    "processes; past AUTH_MAX_STALENESS_SECONDS authentication answers 503.",
                                    value=max(0.0, time.time() - oldest))


# --- shared state, read at scrape time ----------------------------------------------------------

class QueueCollector:
    """The resize queue's ready messages and consumers, and its dead-letter queue's, as this process's
    queue probe last read them (a passive declare every ADMISSION_QUEUE_PROBE_SECONDS, the same
    reading admission control uses: controlplane/admission.py). Works on any broker; production
    also scrapes the rabbitmq_prometheus plugin."""

    def collect(self) -> Iterator[Metric]:
        from controlplane.admission import queue_probe

        probe = queue_probe()
        probe.first.wait(3)  # a process's first scrape: let its probe try once
        fresh = probe.values()
        values, up = fresh or {}, int(fresh is not None)
        ready = GaugeMetricFamily("resizer_queue_messages_ready", "Messages waiting in the queue for a worker.",
                                  labels=["queue"])
        consumers = GaugeMetricFamily("resizer_queue_consumers", "Consumers on the queue: one a Celery worker node, whatever its concurrency.",
                                      labels=["queue"])
        for name, (r, c) in sorted(values.items()):
            ready.add_metric([name], r)
            consumers.add_metric([name], c)
        yield ready
        yield consumers
        yield GaugeMetricFamily("resizer_broker_up", "1 when the broker answered the last queue probe.", value=up)


_SPOOL_SCAN_LIMIT = 10_000


def _first_record_time(path: Path) -> float | None:
    """When the segment's first record was written (its event_time), else None (empty segment)."""
    try:
        with open(path, "rb") as f:
            line = f.readline(65536)
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None  # empty, or its first record is being written
    try:
        event = parse_time(json.loads(line).get("event_time"))
    except (ValueError, AttributeError):
        event = None
    if event is not None:
        return event.timestamp()
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _set_aside_records(directory: Path) -> int:
    """Records in a set-aside directory (rejected/, bad/): the lines of its files, and 1 for an entry
    that cannot be read as a file (a directory, an I/O error): at least one record waits there."""
    total = 0
    try:
        entries = sorted(directory.iterdir())[:_SPOOL_SCAN_LIMIT]
    except OSError:
        return 0
    for path in entries:
        try:
            with open(path, "rb") as f:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
        except OSError:
            lines = 0
        total += max(1, lines)
    return total


class SpoolCollector:
    """Metering lag on this host: the age of the oldest usage record still in the local spool (not
    yet shipped to the staging table), how many segment files wait, and how many records were set
    aside for an operator (rejected/: refused by the table; bad/: unreadable segments), which never
    ship by themselves."""

    def __init__(self, directory: Callable[[], str]) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        directory = Path(self.directory())
        try:
            segments = sorted(directory.glob("*.jsonl"))
        except OSError:
            segments = []
        times = [t for t in (_first_record_time(p) for p in segments[:_SPOOL_SCAN_LIMIT]) if t is not None]
        age = max(0.0, time.time() - min(times)) if times else 0.0
        yield GaugeMetricFamily("resizer_metering_spool_oldest_record_age_seconds",
                                "Age of the oldest usage record in this host's spool not yet shipped (0: none).",
                                value=age)
        yield GaugeMetricFamily("resizer_metering_spool_segments", "Spool segment files waiting to be shipped.",
                                value=len(segments))
        set_aside = GaugeMetricFamily("resizer_metering_spool_set_aside_records",
                                      "Usage records set aside in this host's spool for an operator, never shipped by "
                                      "themselves: rejected (the staging table refused them), bad (unreadable segments; "
                                      "an entry that cannot be read counts 1).", labels=["place"])
        for place in ("rejected", "bad"):
            set_aside.add_metric([place], _set_aside_records(directory / place))
        yield set_aside


# Beat's tasks that leave a row in metering_watermark when a run succeeds: task (the beat entry's
# task name, last part) -> the row's name. The staging sweep leaves none (docs/OPERATIONS.md).
PERIODIC_WATERMARKS = {"usage_rollup": "rollup", "billing_run": "billing", "usage_archive": "archive"}
_PERIODIC_SQL = ("SELECT name, EXTRACT(EPOCH FROM clock_timestamp() - value)::float8 FROM metering_watermark "
                 "WHERE name = ANY(%s)")


# Billing periods still in grace a day after their grace ended: billing runs on (its age stays
# fresh) but cannot finalize them (a period that cannot be priced stays in grace, logged): never invoiced.
_OVERDUE_SQL = ("SELECT count(*) FROM metering_billingperiod WHERE status = 'grace' AND \"end\" <= current_date - %s")


class PeriodicReadings(NamedTuple):
    ages: dict[str, float]  # watermark name -> seconds since it was written (the database's clock)
    billing_overdue: int  # periods billing cannot finalize


def _periodic_readings() -> PeriodicReadings:
    """Both read in one transaction, bounded by a statement timeout (and the connection's
    connect_timeout, DATABASE_CONNECT_TIMEOUT)."""
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL statement_timeout = {int(PeriodicCollector.timeout_seconds * 1000)}")
        cursor.execute(_PERIODIC_SQL, [list(PERIODIC_WATERMARKS.values())])
        ages = {name: float(age) for name, age in cursor.fetchall()}
        cursor.execute(_OVERDUE_SQL, [settings.BILLING_GRACE_DAYS + 1])
        return PeriodicReadings(ages, cursor.fetchone()[0])


class PeriodicCollector:
    """How long ago each periodic job last succeeded (the metering jobs: the age of their watermark row;
    the staging sweep: of its mark in the staging store), and the interval beat runs it at (this node's
    configuration): beat stopped, a job failing every run, or runs always skipped show as an age growing
    past a few intervals. No sample for a job that never ran, nor any metering age when Postgres cannot
    be read (the scrape itself never fails for it)."""

    timeout_seconds = 1.0

    def __init__(self, read: Callable[[], PeriodicReadings] = _periodic_readings) -> None:
        self.read = read

    @staticmethod
    def staging_sweep_age() -> float | None:
        """The staging sweep's age, from its mark in the staging store (this host's clock): the sweep
        keeps no watermark in Postgres. None if no sweep finished yet, or the store cannot be read."""
        from resizer.jobs import staging_sweep_age
        from resizer.staging import staging_store

        try:
            return staging_sweep_age(staging_store())
        except Exception as e:  # noqa: BLE001 - the scrape never fails for it
            logging.getLogger(__name__).debug("staging sweep age not read: %s", e)
            return None

    def collect(self) -> Iterator[Metric]:
        import celeryconfig

        readings: PeriodicReadings | None
        try:
            readings = self.read()
        except Exception as e:  # Postgres away, a timeout, no table yet: no ages this scrape
            logging.getLogger(__name__).debug("periodic job ages not read: %s", e)
            readings = None
        ages = readings.ages if readings else {}
        age = GaugeMetricFamily("resizer_periodic_last_success_age_seconds",
                                "Seconds since the periodic job last succeeded (its watermark row in Postgres, "
                                "by the database's clock): rollup and billing, when their last run began; the "
                                "archive, when its last run ended; the staging sweep, when its last run ended "
                                "(its mark in the staging store).", labels=["task"])
        interval = GaugeMetricFamily("resizer_periodic_interval_seconds",
                                     "The interval beat runs the periodic job at (this node's configuration).",
                                     labels=["task"])
        schedule = {entry["task"].rsplit(".", 1)[-1]: float(entry["schedule"])
                    for entry in celeryconfig.beat_schedule.values()}
        for task, name in PERIODIC_WATERMARKS.items():
            if name in ages:
                age.add_metric([task], max(0.0, ages[name]))
            if task in schedule:
                interval.add_metric([task], schedule[task])
        sweep_age = self.staging_sweep_age()
        if sweep_age is not None:
            age.add_metric(["staging_sweep"], max(0.0, sweep_age))
        if "staging_sweep" in schedule:
            interval.add_metric(["staging_sweep"], schedule["staging_sweep"])
        yield age
        yield interval
        if readings:
            yield GaugeMetricFamily(
                "resizer_billing_periods_overdue", "Billing periods still in grace a day after their grace ended: "
                "billing runs but cannot finalize them (its log says why); never invoiced until fixed.",
                value=readings.billing_overdue)


class CollectorGroup:
    """Several collectors as one (what generate_latest and a registry need: a collect())."""

    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def process_registry() -> Any:
    """This server's metrics: every process's (summed through the multiprocess directory) or, in a
    single process, the default registry."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return prometheus_client.REGISTRY


_queue_collector = QueueCollector()
_spool_collector = SpoolCollector(lambda: settings.METERING_SPOOL_DIR)
_periodic_collector = PeriodicCollector()


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: this API server's metrics (all its processes), plus the shared state above."""
    try:
        auth_snapshot_record()
    except Exception as e:
        logging.getLogger(__name__).debug("auth snapshot gauge not updated: %s", e)
    collectors = CollectorGroup([_WithAuthAge(process_registry()), _queue_collector, _spool_collector,
                                 _periodic_collector])
    return HttpResponse(prometheus_client.generate_latest(collectors),  # type: ignore[arg-type]
                        content_type=prometheus_client.CONTENT_TYPE_LATEST)
