"""Metering's tables: raw usage records (the staging table), hourly and daily rollups, price plans,
billing periods with their invoice lines and appended adjustments, and the archive's file index."""
from __future__ import annotations

from typing import Any

from django.db import models
from django.db.models.functions import Now

# The axes a price plan charges on, and their units.
AXES = {
    "images": "image",
    "input_mb": "MB (10^6 bytes) of input",
    "output_mp": "megapixel of output",
    "cpu_seconds": "CPU-second",
}
AXIS_CHOICES = [(axis, axis) for axis in AXES]


class UsageRecord(models.Model):
    """One finished job on every axis the price depends on. Written only by the spool shipper
    (COPY, then INSERT ... ON CONFLICT (id) DO NOTHING), read by the rollup and the archiver,
    deleted once archived. No foreign keys: the write path checks nothing per row."""

    # The job id: a re-shipped batch or a re-emitted record (worker retry) is the same row.
    id = models.UUIDField(primary_key=True)
    customer_id = models.UUIDField()
    key_id = models.UUIDField(null=True)
    request_id = models.CharField(max_length=200, blank=True)
    event_time = models.DateTimeField(help_text="when the job finished (the worker's clock)")
    # When the row reached this table; the rollup's watermark follows it, so a record that comes
    # days late (a spool shipped after an outage) still finds its window.
    received_at = models.DateTimeField(db_default=Now())
    outcome = models.CharField(max_length=16, help_text="succeeded or failed")
    error_code = models.CharField(max_length=64, blank=True, default="")
    attempts = models.SmallIntegerField(default=1)
    input_format = models.CharField(max_length=16, blank=True, default="")
    input_width = models.IntegerField(null=True)
    input_height = models.IntegerField(null=True)
    input_bytes = models.BigIntegerField(null=True)
    input_megapixels = models.DecimalField(max_digits=14, decimal_places=6, null=True)
    output_format = models.CharField(max_length=16, blank=True, default="")
    output_width = models.IntegerField(null=True)
    output_height = models.IntegerField(null=True)
    output_bytes = models.BigIntegerField(null=True)
    output_megapixels = models.DecimalField(max_digits=14, decimal_places=6, null=True)
    cpu_seconds = models.DecimalField(max_digits=14, decimal_places=6, null=True)
    wall_seconds = models.DecimalField(max_digits=14, decimal_places=6, null=True)
    # What was asked (width, height, fit, format, ...): with the rest, the durable record of the request.
    params = models.JSONField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["received_at"], name="usage_received_at"),
            models.Index(fields=["customer_id", "event_time"], name="usage_customer_time"),
        ]


class UsageRollup(models.Model):
    """A customer's usage in one hour or one UTC day, recomputed whole from raw records (never
    incremented), so a repeated or concurrent rollup run writes the same numbers."""

    class Granularity(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    customer_id = models.UUIDField()
    granularity = models.CharField(max_length=8, choices=Granularity.choices)
    window_start = models.DateTimeField()
    # Billed axes count succeeded jobs only; failed jobs are recorded, and counted here, free.
    images = models.BigIntegerField(default=0)
    failed_images = models.BigIntegerField(default=0)
    input_bytes = models.BigIntegerField(default=0)
    input_megapixels = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    output_bytes = models.BigIntegerField(default=0)
    output_megapixels = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    cpu_seconds = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    wall_seconds = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    # Changes only when a number changes: what billing looks at to find late usage.
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["customer_id", "granularity", "window_start"], name="rollup_window_once"),
        ]
        indexes = [models.Index(fields=["granularity", "updated_at"], name="rollup_updated")]


class Watermark(models.Model):
    """How far a periodic job has read (the rollup and billing: the database clock when their last
    successful run began, which the next one reads from), or when it last ran to the end (the
    archive). /metrics exports the age of each (controlplane/metrics.py)."""

    name = models.CharField(max_length=32, primary_key=True)
    value = models.DateTimeField()


def _refuse_deleting_the_default(plans: Any) -> None:
    """Billing opens every period with the default plan: deleted (allowed while no period used it),
    periods opened with no plan and finalizing them failed every run. Checked before anything is
    deleted, so the caller's transaction stays usable."""
    default = [plan for plan in plans if plan.is_default]
    if default:
        raise models.ProtectedError("the default price plan cannot be deleted: make another plan the default first",
                                    set(default))


class PricePlanQuerySet(models.QuerySet):
    def delete(self) -> tuple[int, dict[str, int]]:
        _refuse_deleting_the_default(self.filter(is_default=True))
        return super().delete()


class PricePlan(models.Model):
    """Prices per axis, in graduated tiers. Treat a plan that has billed as frozen: finalized
    periods keep a copy of the tiers they were priced with. The default plan cannot be deleted."""

    objects = PricePlanQuerySet.as_manager()

    name = models.CharField(max_length=100, unique=True)
    currency = models.CharField(max_length=3, default="USD")
    is_default = models.BooleanField(default=False, help_text="the plan of customers with no assignment")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["is_default"], condition=models.Q(is_default=True), name="one_default_plan"),
        ]

    def __str__(self) -> str:
        return self.name

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        _refuse_deleting_the_default(PricePlan.objects.filter(pk=self.pk, is_default=True))
        return super().delete(*args, **kwargs)


class PriceTier(models.Model):
    """Units of `axis` in a period up to `up_to` (cumulative; empty = no limit) cost `unit_price_micros`
    each (millionths of the currency unit). Tiers are graduated: each unit is priced by its own tier."""

    plan = models.ForeignKey(PricePlan, on_delete=models.CASCADE, related_name="tiers")
    axis = models.CharField(max_length=16, choices=AXIS_CHOICES)
    up_to = models.DecimalField(max_digits=20, decimal_places=6, null=True, blank=True)
    unit_price_micros = models.BigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["plan", "axis", "up_to"], name="tier_once",
                                               nulls_distinct=False)]
        ordering = ["plan", "axis", models.F("up_to").asc(nulls_last=True)]


class CustomerPricePlan(models.Model):
    """A customer's price plan from a date on; a period is priced by the assignment in force on its first day."""

    customer = models.ForeignKey("identity.Customer", on_delete=models.CASCADE, related_name="price_plans")
    plan = models.ForeignKey(PricePlan, on_delete=models.PROTECT)
    effective_from = models.DateField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "effective_from"], name="one_plan_a_day")]


class BillingPeriod(models.Model):
    """One customer's month: open while it runs, in grace while late usage may still arrive,
    then finalized with invoice lines that are never edited again (corrections are adjustments)."""

    class Status(models.TextChoices):
        OPEN = "open"
        GRACE = "grace"
        FINALIZED = "finalized"

    customer = models.ForeignKey("identity.Customer", on_delete=models.PROTECT, related_name="billing_periods")
    start = models.DateField()
    end = models.DateField(help_text="exclusive")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    plan = models.ForeignKey(PricePlan, null=True, blank=True, on_delete=models.PROTECT)
    currency = models.CharField(max_length=3, blank=True, default="")
    # The tiers the period was priced with, so later plan edits cannot reprice a finalized invoice.
    price_snapshot = models.JSONField(null=True, blank=True)
    finalized_at = models.DateTimeField(null=True, blank=True)
    reconciled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "start"], name="one_period_a_start")]
        indexes = [models.Index(fields=["status", "end"], name="period_status_end")]

    def __str__(self) -> str:
        return f"{self.customer} {self.start:%Y-%m}"


class InvoiceLine(models.Model):
    """A finalized period's charge on one axis. Written once, at finalization."""

    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="lines")
    axis = models.CharField(max_length=16, choices=AXIS_CHOICES)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    amount_micros = models.BigIntegerField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["period", "axis"], name="one_line_an_axis")]


class Adjustment(models.Model):
    """A correction appended to a finalized period: late usage found by billing, or an operator's credit."""

    class Kind(models.TextChoices):
        LATE_USAGE = "late_usage"
        MANUAL = "manual"

    period = models.ForeignKey(BillingPeriod, on_delete=models.PROTECT, related_name="adjustments")
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.MANUAL)
    axis = models.CharField(max_length=16, choices=AXIS_CHOICES, blank=True, default="")
    quantity = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    amount_micros = models.BigIntegerField()
    reason = models.CharField(max_length=500)
    created_by = models.CharField(max_length=200, default="system")
    created_at = models.DateTimeField(auto_now_add=True)


class ArchiveFile(models.Model):
    """One compressed file of a customer's raw records of one UTC day, verified before the rows left
    the staging table. A day can have several files (records that arrived after the first export)."""

    customer_id = models.UUIDField()
    day = models.DateField()
    key = models.CharField(max_length=300, unique=True)
    records = models.IntegerField()
    sha256 = models.CharField(max_length=64, help_text="of the uncompressed JSON lines")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["customer_id", "day"], name="archive_customer_day")]
