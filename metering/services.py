"""Metering's writes: emit a job's usage record to the local spool, ship the spool, roll raw records
up per hour and day, move billing periods to finalized invoices, and archive old raw records."""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from billiard.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError, connection, connections, transaction
from psycopg.conninfo import make_conninfo

from controlplane.per_process import PerProcess
from metering import pricing, selectors
from metering.archive import archive_store
from metering.models import Adjustment, ArchiveFile, BillingPeriod, InvoiceLine, Watermark
from metering.spool import COLUMNS, Shipper, ShipperThread, Spool, SpoolError
from resizer.jobs import parse_time

if TYPE_CHECKING:
    from resizer.jobs import Job

log = logging.getLogger(__name__)

# pg_advisory locks: the rollup and billing share one (billing must see every rollup it is told
# about); the archiver has its own.
AGGREGATION_LOCK = 0x6D65_7465_0001
ARCHIVE_LOCK = 0x6D65_7465_0002


# --- usage records --------------------------------------------------------------------------------

def _megapixels(facts: dict[str, Any]) -> str | None:
    if not facts.get("width") or not facts.get("height"):
        return None
    # Every frame is processed, so an animation counts each frame's pixels.
    pixels = int(facts["width"]) * int(facts["height"]) * max(1, int(facts.get("frames") or 1))
    return str(Decimal(pixels) / pricing.MEGA)


def _seconds_between(start: str | None, end: str | None) -> str | None:
    t0, t1 = parse_time(start), parse_time(end)
    if t0 is None or t1 is None:
        return None
    return str(round(max(0.0, (t1 - t0).total_seconds()), 6))


def usage_record(job: Job) -> dict[str, Any]:
    """A finished job's usage record. Deterministic: a redelivered job yields the same record."""
    inp = job.input or {}
    out = job.output or {}
    return {
        "id": job.id,
        "customer_id": job.customer_id,
        "key_id": job.key_id,
        "request_id": job.request_id,
        "event_time": job.finished_at,
        "outcome": job.status,
        "error_code": (job.error or {}).get("code", ""),
        "attempts": job.attempts,
        "input_format": inp.get("format"),
        "input_width": inp.get("width"),
        "input_height": inp.get("height"),
        "input_bytes": inp.get("bytes"),
        "input_megapixels": _megapixels(inp),
        "output_format": out.get("format"),
        "output_width": out.get("width"),
        "output_height": out.get("height"),
        "output_bytes": out.get("bytes"),
        "output_megapixels": _megapixels(out),
        "cpu_seconds": None if job.cpu_seconds is None else str(job.cpu_seconds),
        "wall_seconds": _seconds_between(job.started_at, job.finished_at),
        "params": job.params,
    }


def _shipper(directory: Path) -> Shipper:
    return Shipper(directory, batch_records=settings.METERING_BATCH_RECORDS,
                   statement_timeout=settings.METERING_SHIP_STATEMENT_TIMEOUT_SECONDS,
                   idle_timeout=settings.METERING_SHIP_IDLE_TIMEOUT_SECONDS)


def _local_spool() -> Spool:
    spool = Spool(Path(settings.METERING_SPOOL_DIR), segment_records=settings.METERING_BATCH_RECORDS)
    if settings.METERING_SHIPPER:
        shipper = _shipper(Path(settings.METERING_SPOOL_DIR))
        ShipperThread(shipper, conninfo=staging_conninfo, interval=settings.METERING_FLUSH_SECONDS,
                      wake=spool.rotated)
    return spool


# This process's spool writer and its shipper thread, started on first use (so a prefork child
# starts its own after the fork). Worker children start it as they start (controlplane/celery.py), not
# at their first job: segments a killed process left are shipped by whichever process runs, and a
# host no job reaches any more must ship them too. (No ship at a child's exit: it would hold the
# worker's shutdown for as long as Postgres takes; another child, or the next start, ships them.)
local_spool = PerProcess(_local_spool)


def usage_record_emit(*, job: Job) -> None:
    """Make a finished job's usage record durable on local disk. Raises SpoolError (a StagingError:
    the task requeues the job) rather than let the job be announced without it, whatever failed: any
    other exception (the shipper thread not starting under the worker's memory cap, say) failed the
    task, whose message is then acked, leaving the job decided, running and unrecorded for good."""
    try:
        local_spool().append(usage_record(job))
    except (SpoolError, SoftTimeLimitExceeded):
        raise  # requeued by the task as they are (a time limit at once, without the store's pause)
    except Exception as e:  # noqa: BLE001
        raise SpoolError(f"usage record not written: {type(e).__name__}: {e}") from e


def staging_conninfo() -> str:
    """How to reach the staging table: METERING_DATABASE_URL (another way into Django's database, e.g. a
    pooler: the rollup reads the table through Django's connection), else Django's own settings."""
    if settings.METERING_DATABASE_URL:
        return settings.METERING_DATABASE_URL
    s = connections["default"].settings_dict
    return make_conninfo("", host=s["HOST"] or None, port=str(s["PORT"]) if s["PORT"] else None,
                         dbname=s["NAME"], user=s["USER"] or None, password=s["PASSWORD"] or None)


def usage_ship(*, directory: Path | None = None, conninfo: str | None = None) -> int:
    """Ship a spool directory once (what the shipper thread does every tick). Raises ShipError."""
    shipper = _shipper(Path(directory or settings.METERING_SPOOL_DIR))
    try:
        return shipper.ship(conninfo=conninfo or staging_conninfo())
    finally:
        shipper.close()


# --- rollups --------------------------------------------------------------------------------------

_SUMS = ("images", "failed_images", "input_bytes", "input_megapixels", "output_bytes", "output_megapixels",
         "cpu_seconds", "wall_seconds")
_SET = ", ".join(f"{c} = EXCLUDED.{c}" for c in _SUMS)
_CHANGED = f"({', '.join('r.' + c for c in _SUMS)}) IS DISTINCT FROM ({', '.join('EXCLUDED.' + c for c in _SUMS)})"
_ON_CONFLICT = (f"ON CONFLICT (customer_id, granularity, window_start) DO UPDATE SET {_SET}, "
                f"updated_at = EXCLUDED.updated_at WHERE {_CHANGED}")
_INTO = f"INSERT INTO metering_usagerollup AS r (customer_id, granularity, window_start, {', '.join(_SUMS)}, updated_at)"

# Recompute, whole, every hour window that a record received since `since` falls in.
_HOURLY_SQL = f"""
WITH touched AS (
    SELECT DISTINCT customer_id, date_trunc('hour', event_time) AS window_start
    FROM metering_usagerecord
    WHERE received_at >= %(since)s AND event_time >= %(horizon)s
)
{_INTO}
SELECT t.customer_id, 'hour', t.window_start,
       count(*) FILTER (WHERE u.outcome = 'succeeded'),
       count(*) FILTER (WHERE u.outcome <> 'succeeded'),
       coalesce(sum(u.input_bytes) FILTER (WHERE u.outcome = 'succeeded'), 0),
       coalesce(sum(u.input_megapixels) FILTER (WHERE u.outcome = 'succeeded'), 0),
       coalesce(sum(u.output_bytes) FILTER (WHERE u.outcome = 'succeeded'), 0),
       coalesce(sum(u.output_megapixels) FILTER (WHERE u.outcome = 'succeeded'), 0),
       coalesce(sum(u.cpu_seconds) FILTER (WHERE u.outcome = 'succeeded'), 0),
       coalesce(sum(u.wall_seconds) FILTER (WHERE u.outcome = 'succeeded'), 0),
       %(run_at)s
FROM touched t
JOIN metering_usagerecord u ON u.customer_id = t.customer_id
     AND u.event_time >= t.window_start AND u.event_time < t.window_start + interval '1 hour'
GROUP BY t.customer_id, t.window_start
{_ON_CONFLICT}
"""

# Recompute every day whose hours changed in this run, from its hours.
_DAILY_SQL = f"""
WITH touched AS (
    SELECT DISTINCT customer_id, date_trunc('day', window_start) AS window_start
    FROM metering_usagerollup
    WHERE granularity = 'hour' AND updated_at = %(run_at)s
)
{_INTO}
SELECT t.customer_id, 'day', t.window_start, {', '.join(f'sum(h.{c})' for c in _SUMS)}, %(run_at)s
FROM touched t
JOIN metering_usagerollup h ON h.customer_id = t.customer_id AND h.granularity = 'hour'
     AND h.window_start >= t.window_start AND h.window_start < t.window_start + interval '1 day'
GROUP BY t.customer_id, t.window_start
{_ON_CONFLICT}
"""


# Records received since the last run (minus the look-back: one committing late is not missed, so each
# is reported by every run within the look-back) whose event is past the horizon: never rolled up nor billed.
_TOO_OLD_SQL = """
SELECT count(*), count(DISTINCT customer_id), min(event_time) FROM metering_usagerecord
WHERE received_at >= %(since)s AND event_time < %(horizon)s
"""


class _Busy(Exception):
    """Another rollup or billing run held the lock past METERING_LOCK_WAIT_SECONDS."""


def _locked_clock(cursor: Any, key: int) -> datetime:
    """Take a transaction-scoped advisory lock, then read the clock: work done under the lock is
    stamped later than everything committed before it. Waits for the lock at most
    METERING_LOCK_WAIT_SECONDS, then raises _Busy: until 2026-11-22 it waited without bound, and each
    run beat sent (every minute) while a long billing run held the lock took a worker process away
    from resizing until its 25-minute time limit, all of them after a few minutes."""
    cursor.execute("SET LOCAL TIME ZONE 'UTC'")
    cursor.execute(f"SET LOCAL lock_timeout = {max(1, int(settings.METERING_LOCK_WAIT_SECONDS * 1000))}")
    try:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [key])
    except OperationalError as e:
        if getattr(e.__cause__, "sqlstate", None) == "55P03":  # lock_not_available
            raise _Busy() from e
        raise
    cursor.execute("SET LOCAL lock_timeout = DEFAULT")  # the run's own row locks wait as usual
    cursor.execute("SELECT clock_timestamp()")
    return cursor.fetchone()[0]


def _skipped_when_busy(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A run that waited METERING_LOCK_WAIT_SECONDS for the one before it is skipped (_Busy): the next
    run does the same work."""

    @functools.wraps(run)
    def run_or_skip(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return run(*args, **kwargs)
        except _Busy:
            skipped = "another rollup or billing run held the lock; the next run catches up"
            log.info("%s skipped: %s", run.__name__, skipped)
            return {"skipped": skipped}

    return run_or_skip


@_skipped_when_busy
def usage_rollup() -> dict[str, Any]:
    """Roll raw records up per customer per hour and day. Recomputes whole windows (never adds), so
    a second or concurrent run writes nothing new; the watermark minus a look-back finds the
    windows that late records landed in."""
    with transaction.atomic(), connection.cursor() as cursor:
        return _rollup(cursor, _locked_clock(cursor, AGGREGATION_LOCK))


def _rollup(cursor: Any, run_at: datetime) -> dict[str, Any]:
    """usage_rollup's work, under the aggregation lock (billing_run's too, before it finalizes)."""
    lookback = timedelta(seconds=settings.METERING_LOOKBACK_SECONDS)
    mark = Watermark.objects.filter(name="rollup").first()
    since = mark.value - lookback if mark else datetime.min.replace(tzinfo=timezone.utc)
    # Older windows may have left for the archive; never recompute them from what is left.
    horizon = run_at - timedelta(days=settings.METERING_ARCHIVE_AFTER_DAYS - 1)
    cursor.execute(_HOURLY_SQL, {"since": since, "horizon": horizon, "run_at": run_at})
    hours = cursor.rowcount
    cursor.execute(_DAILY_SQL, {"run_at": run_at})
    days = cursor.rowcount
    # Said, not dropped in silence (until 2026-11-22 nothing told): usage that arrived after its
    # window may have left for the archive is archived, not billed automatically (ADR 0004).
    cursor.execute(_TOO_OLD_SQL, {"since": since, "horizon": horizon})
    too_old, customers, oldest = cursor.fetchone()
    if too_old:
        log.warning("usage rollup: %d record(s) of %d customer(s) arrived after the rollup horizon (%s; the "
                    "oldest event %s) and are not rolled up or billed", too_old, customers,
                    horizon.isoformat(), oldest.isoformat())
    Watermark.objects.update_or_create(name="rollup", defaults={"value": run_at})
    result = {"hours": hours, "days": days, "watermark": run_at.isoformat()}
    if too_old:
        result["too_old"] = too_old
    return result


# --- billing --------------------------------------------------------------------------------------

# A period opens with the default plan of the moment (the default has no history of its own, so a
# later change of default does not reach periods already open). Assignments are not recorded here:
# finalization looks them up (an assignment removed meanwhile must not price the period).
_OPEN_PERIODS_SQL = """
INSERT INTO metering_billingperiod (customer_id, start, "end", status, currency, plan_id)
SELECT m.customer_id, m.start, (m.start + interval '1 month')::date, 'open', '',
       (SELECT p.id FROM metering_priceplan p WHERE p.is_default)
FROM (SELECT DISTINCT r.customer_id, date_trunc('month', r.window_start)::date AS start
      FROM metering_usagerollup r JOIN identity_customer c ON c.id = r.customer_id
      WHERE r.granularity = 'day' AND r.updated_at >= %(since)s) m
ON CONFLICT (customer_id, start) DO NOTHING
"""

_ORPHANED_USAGE_SQL = """
SELECT DISTINCT r.customer_id FROM metering_usagerollup r
LEFT JOIN identity_customer c ON c.id = r.customer_id
WHERE r.granularity = 'day' AND r.updated_at >= %(since)s AND c.id IS NULL
"""

# Finalized periods with a day whose numbers changed since the period was last reconciled.
_TO_RECONCILE_SQL = """
SELECT DISTINCT p.id FROM metering_usagerollup r
JOIN metering_billingperiod p ON p.customer_id = r.customer_id
     AND r.window_start >= p.start AND r.window_start < p."end"
WHERE r.granularity = 'day' AND r.updated_at >= %(since)s
  AND p.status = 'finalized' AND r.updated_at > p.reconciled_at
"""


@_skipped_when_busy
def billing_run(*, today: date | None = None) -> dict[str, Any]:
    """Open a period for every customer month with usage; move periods past their end to grace and
    past their grace to finalized (invoice lines); append adjustments for usage that reached a
    finalized period later. Every step is idempotent; runs are serialized with the rollup (a run that
    waited METERING_LOCK_WAIT_SECONDS for the lock is skipped: the next one does the same work)."""
    counts = {"opened": 0, "grace": 0, "finalized": 0, "adjusted": 0}
    failed = 0
    with transaction.atomic(), connection.cursor() as cursor:
        run_at = _locked_clock(cursor, AGGREGATION_LOCK)
        today = today or run_at.date()
        mark = Watermark.objects.filter(name="billing").first()
        since = mark.value if mark else datetime.min.replace(tzinfo=timezone.utc)
        cursor.execute(_OPEN_PERIODS_SQL, {"since": since})
        counts["opened"] = cursor.rowcount
        # Usage of a customer deleted meanwhile (its records were still in a worker's spool when the
        # delete checked for usage) opens no period: said, not dropped in silence.
        cursor.execute(_ORPHANED_USAGE_SQL, {"since": since})
        orphaned = cursor.fetchall()
        if orphaned:
            log.warning("billing: usage of %d deleted customer(s) is not billed: %s", len(orphaned),
                        ", ".join(str(customer_id) for (customer_id,) in orphaned[:20]))
        counts["grace"] = BillingPeriod.objects.filter(status=BillingPeriod.Status.OPEN, end__lte=today).update(
            status=BillingPeriod.Status.GRACE)
        due = today - timedelta(days=settings.BILLING_GRACE_DAYS)
        due_periods = BillingPeriod.objects.filter(status=BillingPeriod.Status.GRACE, end__lte=due)
        if due_periods.exists():
            # Invoices are priced from the rollups: roll up first what has been received since the last
            # rollup. After beat was away the overdue billing run came before the rollup and finalized
            # an invoice short, the rest then appended as "late usage" adjustments.
            _rollup(cursor, run_at)
        for period in due_periods:
            # A savepoint per period: one that cannot be priced (no plan, say) stays in grace, logged,
            # and is tried again next run; until 2026-11-22 it rolled back every customer's invoice, every run.
            try:
                with transaction.atomic():
                    billing_period_finalize(period=period, at=run_at)
            except Exception:  # noqa: BLE001 - whatever it is, the other customers are billed
                log.exception("billing: period %s (customer %s, %s) not finalized; it stays in grace",
                              period.pk, period.customer_id, f"{period.start:%Y-%m}")
                failed += 1
                continue
            counts["finalized"] += 1
        cursor.execute(_TO_RECONCILE_SQL, {"since": since})
        for (period_id,) in cursor.fetchall():
            counts["adjusted"] += billing_period_reconcile(period=BillingPeriod.objects.get(pk=period_id), at=run_at)
        Watermark.objects.update_or_create(name="billing", defaults={"value": run_at})
    if failed:
        counts["not_finalized"] = failed
    return counts


def billing_period_finalize(*, period: BillingPeriod, at: datetime) -> BillingPeriod:
    """Price the period's usage with the plan in force on its first day, write one invoice line per
    axis, and freeze the tiers used. Call under the aggregation lock."""
    plan, snapshot = selectors.price_plan_for(customer_id=period.customer_id, on=period.start,
                                              default=period.plan)
    quantities = pricing.quantities(selectors.period_totals(customer_id=period.customer_id,
                                                            start=period.start, end=period.end))
    InvoiceLine.objects.bulk_create([
        InvoiceLine(period=period, axis=axis, quantity=quantity,
                    amount_micros=pricing.amount_micros(snapshot["tiers"].get(axis, []), quantity))
        for axis, quantity in quantities.items()
    ])
    period.status = BillingPeriod.Status.FINALIZED
    period.plan = plan
    period.currency = snapshot["currency"]
    period.price_snapshot = snapshot
    period.finalized_at = period.reconciled_at = at
    period.save(update_fields=["status", "plan", "currency", "price_snapshot", "finalized_at", "reconciled_at"])
    return period


def billing_period_reconcile(*, period: BillingPeriod, at: datetime) -> int:
    """Append a late-usage adjustment per axis where the period's usage now differs from what was
    billed (lines plus earlier late-usage adjustments). Returns how many were appended."""
    billed = selectors.period_billed(period=period)
    quantities = pricing.quantities(selectors.period_totals(customer_id=period.customer_id,
                                                            start=period.start, end=period.end))
    tiers = (period.price_snapshot or {}).get("tiers", {})
    appended = 0
    for axis, quantity in quantities.items():
        billed_quantity, billed_amount = billed.get(axis, (Decimal(0), 0))
        delta_quantity = quantity - billed_quantity
        delta_amount = pricing.amount_micros(tiers.get(axis, []), quantity) - billed_amount
        if delta_quantity or delta_amount:
            Adjustment.objects.create(period=period, kind=Adjustment.Kind.LATE_USAGE, axis=axis,
                                      quantity=delta_quantity, amount_micros=delta_amount,
                                      reason=f"usage recorded after finalization, found {at:%Y-%m-%d %H:%M} UTC")
            appended += 1
    period.reconciled_at = at
    period.save(update_fields=["reconciled_at"])
    return appended


def adjustment_create(*, period: BillingPeriod, amount_micros: int, reason: str, by: str) -> Adjustment:
    """An operator's correction (a credit is negative) to a finalized period: appended, never an edit."""
    if period.status != BillingPeriod.Status.FINALIZED:
        raise ValueError("only a finalized period takes adjustments; an open one is still being computed")
    return Adjustment.objects.create(period=period, kind=Adjustment.Kind.MANUAL, amount_micros=amount_micros,
                                     reason=reason, created_by=by)


# --- archive --------------------------------------------------------------------------------------

class ArchiveVerifyError(Exception):
    """What was read back from the archive is not what was written; the rows stay."""


_ARCHIVE_GROUPS_SQL = """
SELECT customer_id, (event_time AT TIME ZONE 'UTC')::date AS day FROM metering_usagerecord
WHERE event_time < %(cutoff)s GROUP BY 1, 2 ORDER BY 2, 1 LIMIT %(limit)s
"""
_ARCHIVE_ROWS_SQL = f"""
SELECT {', '.join(COLUMNS)}, received_at FROM metering_usagerecord
WHERE customer_id = %(customer_id)s AND event_time >= %(start)s AND event_time < %(end)s
ORDER BY event_time, id LIMIT %(limit)s
"""
# Records per archive file: what one part holds in memory (rows, the JSON body, its gzip), whatever
# a customer's day holds (at 10,000 resizes/s one customer can make tens of millions a day).
ARCHIVE_FILE_RECORDS = 50_000


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if value is None or isinstance(value, (int, str, dict, list)):
        return value
    return str(value)  # UUID, Decimal: exact as text


_ARCHIVE_RAN_SQL = """
INSERT INTO metering_watermark (name, value) VALUES ('archive', clock_timestamp())
ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value
"""


def usage_archive(*, now: datetime | None = None, max_days: int = 10_000) -> dict[str, int]:
    """Export raw records of whole UTC days older than METERING_ARCHIVE_AFTER_DAYS, one gzip'd JSON
    lines file per customer and day; read each file back and check its count and SHA-256 before
    the rows are deleted, in the same transaction that indexes the file."""
    now = now or datetime.now(timezone.utc)
    cutoff_day = (now - timedelta(days=settings.METERING_ARCHIVE_AFTER_DAYS)).date()
    cutoff = selectors.midnight(cutoff_day)
    done = {"files": 0, "records": 0}
    store = archive_store()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [ARCHIVE_LOCK])
        if not cursor.fetchone()[0]:
            return done  # another archiver is at work
        try:
            cursor.execute(_ARCHIVE_GROUPS_SQL, {"cutoff": cutoff, "limit": max_days})
            for customer_id, day in cursor.fetchall():
                # A day in files of ARCHIVE_FILE_RECORDS, each verified and its rows deleted before the
                # next is read: memory stays bounded, and a run cut short keeps what it finished.
                while records := _archive_part(cursor, store, customer_id=customer_id, day=day):
                    done["records"] += records
                    done["files"] += 1
            # The run's trace (no watermark is read back: every run looks at every day past the cutoff):
            # when the last complete run ended, for the age /metrics exports (controlplane/metrics.py).
            cursor.execute(_ARCHIVE_RAN_SQL)
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [ARCHIVE_LOCK])
    return done


def _archive_part(cursor: Any, store: Any, *, customer_id: Any, day: date) -> int:
    """Archive the next (at most) ARCHIVE_FILE_RECORDS records of the customer's day; 0 when none are left."""
    start = selectors.midnight(day)
    cursor.execute(_ARCHIVE_ROWS_SQL, {"customer_id": customer_id, "start": start, "end": start + timedelta(days=1),
                                       "limit": ARCHIVE_FILE_RECORDS})
    names = [*COLUMNS, "received_at"]
    rows = cursor.fetchall()
    if not rows:
        return 0
    body = b"".join(
        json.dumps({n: _jsonable(v) for n, v in zip(names, row)}, separators=(",", ":")).encode() + b"\n"
        for row in rows
    )
    digest = hashlib.sha256(body).hexdigest()
    # Named by content: re-running after a crash rewrites the same file, not a second copy.
    key = f"usage/{customer_id}/{day:%Y/%m/%d}/{digest[:16]}.jsonl.gz"
    store.put(key, gzip.compress(body, mtime=0))
    back = gzip.decompress(store.get(key))
    if hashlib.sha256(back).hexdigest() != digest or back.count(b"\n") != len(rows):
        raise ArchiveVerifyError(f"archive file {key} does not read back as written")
    with transaction.atomic():
        ArchiveFile.objects.get_or_create(key=key, defaults={"customer_id": customer_id, "day": day,
                                                             "records": len(rows), "sha256": digest})
        cursor.execute("DELETE FROM metering_usagerecord WHERE id = ANY(%s)", [[row[0] for row in rows]])
    return len(rows)
