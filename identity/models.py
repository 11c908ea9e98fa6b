"""The management plane's tables: plans, customers, API keys, the change feed and the audit trail.

Every write goes through identity.services, which appends to the change feed (what the data plane
follows) and to the audit trail in the same transaction.
"""
from __future__ import annotations

import uuid

from django.db import models
from django.db.models.functions import Now

SCOPES = ("resize", "jobs", "usage", "admin")
DEFAULT_SCOPES = ["resize", "jobs", "usage"]


class Plan(models.Model):
    """What a customer may do: a request rate with a burst, and a monthly number of images."""

    name = models.CharField(max_length=100, unique=True)
    rate_per_second = models.FloatField(default=50.0)
    burst = models.PositiveIntegerField(default=100)
    monthly_quota = models.PositiveBigIntegerField(null=True, blank=True, help_text="images a month; empty = unlimited")

    def __str__(self) -> str:
        return self.name


class Customer(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    plan = models.ForeignKey(Plan, null=True, blank=True, on_delete=models.PROTECT,
                             help_text="empty = the default plan (settings.DEFAULT_PLAN_*)")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, default="default")
    # Public, indexed: finds the row without revealing anything that authenticates.
    prefix = models.CharField(max_length=16, unique=True)
    # HMAC-SHA256(pepper, key), hex. A fast keyed hash, not a password hash: keys are long random
    # secrets (no dictionary to attack) and this runs on every request.
    secret_hash = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Written in batches by the data plane, never on the request path.
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix} ({self.customer})"


class Change(models.Model):
    """The change feed: one row per management write that can alter authentication.

    Data-plane caches read it incrementally by id; ids may commit out of order, which the reader
    covers with a look-back window (identity/dataplane.py)."""

    id = models.BigAutoField(primary_key=True)
    customer_id = models.UUIDField(db_index=True)
    # The database's clock, as the readers' look-back window (now() - N s) is: an API host's clock
    # running behind would put a change before the window and delay it to the next full resync. Now()
    # is the INSERT's own time on PostgreSQL (statement_timestamp()), never the transaction's start:
    # every service writes its row as its last statement, so a write that waited on locks stamps its
    # row after the wait.
    created_at = models.DateTimeField(db_default=Now(), db_index=True)


class AuditEvent(models.Model):
    """Who did what to which customer, when. Appended, never edited."""

    at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.CharField(max_length=200, help_text="staff:<username>, key:<prefix>, command, or system")
    action = models.CharField(max_length=64)
    customer = models.ForeignKey(Customer, null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="audit_events")
    details = models.JSONField(default=dict)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["customer", "-at"])]


class ApiProcess(models.Model):
    """A heartbeat per running API process: how many share a customer's rate limit."""

    name = models.CharField(max_length=200, primary_key=True)
    seen_at = models.DateTimeField()


class QuotaUsage(models.Model):
    """Images admitted per customer per month, summed from every API process's counts."""

    customer = models.ForeignKey(Customer, on_delete=models.CASCADE)
    month = models.DateField()
    used = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["customer", "month"], name="quota_usage_once")]


