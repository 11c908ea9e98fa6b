"""`manage.py billing_report --period 2026-11 [--customer ID|NAME]`: the billing report as CSV."""
from __future__ import annotations

import csv
from datetime import date

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import selectors
from metering.models import BillingPeriod


class Command(BaseCommand):
    help = "Print billing reports (invoice lines, adjustments, totals) as CSV, for one month."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--period", required=True, help="the month, YYYY-MM")
        parser.add_argument("--customer", help="a customer id or exact name; default every customer")

    def handle(self, *args: object, period: str, customer: str | None, **options: object) -> None:
        try:
            start = date.fromisoformat(f"{period}-01")
        except ValueError:
            raise CommandError("--period must be YYYY-MM") from None
        periods = BillingPeriod.objects.filter(start=start).select_related("customer").order_by("customer__name")
        if customer:
            from identity.models import Customer

            match = Customer.objects.filter(pk=customer) if _is_uuid(customer) else Customer.objects.none()
            if not match.exists():
                match = Customer.objects.filter(name=customer)
            if not match.exists():  # not "no bill this month": an empty report would read as that
                raise CommandError(f"There is no customer {customer!r} (an id or an exact name).")
            ids = [str(pk) for pk in match.values_list("pk", flat=True)[:11]]
            if len(ids) > 1:  # names are not unique: one report must not merge several customers
                raise CommandError(f"{len(ids) if len(ids) <= 10 else 'More than 10'} customers are named "
                                   f"{customer!r}; give an id: {', '.join(ids[:10])}.")
            periods = periods.filter(customer__in=match)
        writer = csv.writer(self.stdout)
        writer.writerow(selectors.REPORT_HEADER)
        for p in periods:
            writer.writerows(map(selectors.spreadsheet_safe, selectors.billing_report_rows(period=p)))


def _is_uuid(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
