"""Metering fixtures: usage records made to order, the default price plan, a fresh spool directory."""
from __future__ import annotations

import importlib
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from metering.spool import COLUMNS, record_row


def usage(customer_id: Any, *, at: datetime | None = None, outcome: str = "succeeded", **fields: Any) -> dict[str, Any]:
    """A usage record as the worker emits it (the spool's JSON shape)."""
    at = at or datetime.now(timezone.utc) - timedelta(minutes=5)
    record = {
        "id": uuid.uuid4().hex, "customer_id": str(customer_id), "key_id": str(uuid.uuid4()), "request_id": "req",
        "event_time": at.isoformat(), "outcome": outcome, "error_code": "" if outcome == "succeeded" else "corrupt_image",
        "attempts": 1, "input_format": "jpeg", "input_width": 1000, "input_height": 500, "input_bytes": 250_000,
        "input_megapixels": "0.5", "output_format": "jpeg", "output_width": 200, "output_height": 100,
        "output_bytes": 9_000, "output_megapixels": "0.02", "cpu_seconds": "0.007", "wall_seconds": "0.009",
    }
    if outcome != "succeeded":
        record.update(output_format="", output_width=None, output_height=None, output_bytes=None,
                      output_megapixels=None, cpu_seconds=None)
    record.update(fields)
    return record


def insert(*records: dict[str, Any], received_at: datetime | None = None) -> None:
    """Put records straight into the staging table (what a shipped batch does), in the test's transaction."""
    from metering.models import UsageRecord

    extra = {"received_at": received_at} if received_at else {}
    UsageRecord.objects.bulk_create([UsageRecord(**dict(zip(COLUMNS, record_row(r))), **extra) for r in records])


@pytest.fixture
def standard_plan(db):
    """The default price plan of migration 0002 (a transactional test may have flushed it)."""
    from metering.models import PricePlan, PriceTier

    plan = PricePlan.objects.filter(is_default=True).first()
    if plan is None:
        migration = importlib.import_module("metering.migrations.0002_default_price_plan")
        plan = PricePlan.objects.create(name="standard", currency="USD", is_default=True)
        for axis, up_to, micros in migration.STANDARD:
            PriceTier.objects.create(plan=plan, axis=axis, up_to=up_to, unit_price_micros=micros)
    return plan


@pytest.fixture
def spool_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="usage-spool-"))


@pytest.fixture
def customer(db):
    from identity.services import customer_create

    return customer_create(name=f"billed-{uuid.uuid4().hex[:6]}")
