"""Celery beat's metering jobs: a thin interface over metering.services."""
from __future__ import annotations

from typing import Any

from celery import shared_task

from celeryconfig import PERIODIC_TASK_LIMITS
from metering import services


@shared_task(name="metering.tasks.usage_rollup", **PERIODIC_TASK_LIMITS)
def usage_rollup() -> dict[str, Any]:
    return services.usage_rollup()


@shared_task(name="metering.tasks.billing_run", **PERIODIC_TASK_LIMITS)
def billing_run() -> dict[str, Any]:
    return services.billing_run()


@shared_task(name="metering.tasks.usage_archive", **PERIODIC_TASK_LIMITS)
def usage_archive() -> dict[str, int]:
    return services.usage_archive()
