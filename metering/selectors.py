"""Metering's reads: a customer's usage windows, a period's totals and bills, the report, the archive."""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import Any

from django.db.models import Sum

from metering import pricing
from metering.archive import archive_store
from metering.models import (
    AXES,
    Adjustment,
    ArchiveFile,
    BillingPeriod,
    CustomerPricePlan,
    PricePlan,
    UsageRecord,
    UsageRollup,
    Watermark,
)

USAGE_FIELDS = ("images", "failed_images", "input_bytes", "input_megapixels", "output_bytes", "output_megapixels",
                "cpu_seconds", "wall_seconds")


def midnight(day: date) -> datetime:
    """The start of a UTC day (billing periods and daily windows are UTC)."""
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


class NoPricePlan(Exception):
    """No assignment, no plan recorded on the period and no default plan: nothing to price with."""


def price_plan_for(*, customer_id: Any, on: date, default: PricePlan | None = None) -> tuple[PricePlan, dict[str, Any]]:
    """The plan in force for a customer on a day: its assignment from that day, else `default` (the
    plan its period opened with), else the default plan now; with its tiers as a snapshot:
    {"plan": name, "currency": ..., "tiers": {axis: [[up_to, micros], ...]}}."""
    assignment = (CustomerPricePlan.objects.filter(customer_id=customer_id, effective_from__lte=on)
                  .select_related("plan").order_by("-effective_from").first())
    plan = assignment.plan if assignment else default or PricePlan.objects.filter(is_default=True).first()
    if plan is None:
        raise NoPricePlan(f"customer {customer_id} has no price plan on {on} and no plan is the default")
    tiers: dict[str, list[list[Any]]] = {}
    for tier in plan.tiers.all():  # ordered by axis, then up_to with the unbounded tier last
        tiers.setdefault(tier.axis, []).append([None if tier.up_to is None else str(tier.up_to),
                                                tier.unit_price_micros])
    return plan, {"plan": plan.name, "currency": plan.currency, "tiers": tiers}


def customer_has_usage(*, customer_id: Any) -> bool:
    """Usage is recorded for the customer (raw or rolled up): it is billed even if no period is open yet."""
    return (UsageRecord.objects.filter(customer_id=customer_id).exists()
            or UsageRollup.objects.filter(customer_id=customer_id).exists())


def period_totals(*, customer_id: Any, start: date, end: date) -> dict[str, Any]:
    """A customer's summed daily rollups for [start, end)."""
    totals = UsageRollup.objects.filter(customer_id=customer_id, granularity=UsageRollup.Granularity.DAY,
                                        window_start__gte=midnight(start), window_start__lt=midnight(end)).aggregate(
        **{field: Sum(field) for field in USAGE_FIELDS})
    return {k: v or 0 for k, v in totals.items()}


def period_billed(*, period: BillingPeriod) -> dict[str, tuple[Decimal, int]]:
    """What a finalized period has charged per axis so far: its lines plus late-usage adjustments."""
    billed = {line.axis: (line.quantity, line.amount_micros) for line in period.lines.all()}
    for adjustment in period.adjustments.filter(kind=Adjustment.Kind.LATE_USAGE):
        quantity, amount = billed.get(adjustment.axis, (Decimal(0), 0))
        billed[adjustment.axis] = (quantity + adjustment.quantity, amount + adjustment.amount_micros)
    return billed


def usage_as_of() -> datetime | None:
    """Records received before this are in the rollups (the rollup's watermark)."""
    mark = Watermark.objects.filter(name="rollup").first()
    return mark.value if mark else None


def usage_windows(*, customer_id: Any, granularity: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    rows = (UsageRollup.objects.filter(customer_id=customer_id, granularity=granularity,
                                       window_start__gte=start, window_start__lt=end)
            .order_by("window_start").values("window_start", *USAGE_FIELDS))
    return list(rows)


REPORT_HEADER = ["customer_id", "customer", "period_start", "period_end", "status", "plan", "currency",
                 "kind", "axis", "unit", "quantity", "amount", "reason", "at"]


def spreadsheet_safe(row: list[Any]) -> list[Any]:
    """The row with each text cell a spreadsheet would run as a formula (a customer named
    `=HYPERLINK(...)`, a plan or an adjustment's reason starting with =, +, - or @) quoted with a
    leading apostrophe; numbers, negative amounts included, left as they are. For every CSV of the
    report (the command and the admin's downloads)."""
    return [_spreadsheet_cell(value) for value in row]


def _spreadsheet_cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def billing_report_rows(*, period: BillingPeriod) -> Iterator[list[Any]]:
    """One row per invoice line and adjustment, then the total. An unfinalized period is priced
    provisionally, from the current rollups and the plan in force, marked `provisional`."""
    head = [str(period.customer_id), period.customer.name, period.start.isoformat(), period.end.isoformat(),
            period.status]
    if period.status == BillingPeriod.Status.FINALIZED:
        snapshot = period.price_snapshot or {}
        lines = [("line", line.axis, line.quantity, line.amount_micros, "", period.finalized_at)
                 for line in period.lines.order_by("id")]
        lines += [(a.kind, a.axis, a.quantity, a.amount_micros, a.reason, a.created_at)
                  for a in period.adjustments.order_by("id")]
    else:
        _, snapshot = price_plan_for(customer_id=period.customer_id, on=period.start, default=period.plan)
        quantities = pricing.quantities(period_totals(customer_id=period.customer_id, start=period.start,
                                                      end=period.end))
        lines = [("provisional", axis, quantity, pricing.amount_micros(snapshot["tiers"].get(axis, []), quantity),
                  "", None) for axis, quantity in quantities.items()]
    plan, currency = snapshot.get("plan", ""), snapshot.get("currency", "")
    total = 0
    for kind, axis, quantity, micros, reason, at in lines:
        total += micros
        yield [*head, plan, currency, kind, axis, AXES.get(axis, ""), quantity, pricing.money(micros), reason,
               at.isoformat() if at else ""]
    yield [*head, plan, currency, "total", "", "", "", pricing.money(total), "", ""]


def archived_records(*, customer_id: Any, day: date) -> Iterator[dict[str, Any]]:
    """A customer's archived raw records of one UTC day, each file checked against its SHA-256."""
    store = archive_store()
    for file in ArchiveFile.objects.filter(customer_id=customer_id, day=day).order_by("created_at", "id"):
        body = gzip.decompress(store.get(file.key))
        if hashlib.sha256(body).hexdigest() != file.sha256:
            raise ValueError(f"archive file {file.key} does not match its checksum")
        for line in body.splitlines():
            yield json.loads(line)


def recent_requests(*, customer_id: Any, limit: int = 20) -> list[UsageRecord]:
    """A customer's latest resize requests, as recorded (the request record the audit trail needs)."""
    return list(UsageRecord.objects.filter(customer_id=customer_id).order_by("-event_time")[:limit])
