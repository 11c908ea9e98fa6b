"""`manage.py usage_archive_read --customer ID --day YYYY-MM-DD`: archived raw records as JSON lines."""
from __future__ import annotations

import json
import uuid
import zlib
from datetime import date

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import selectors


class Command(BaseCommand):
    help = "Print a customer's archived usage records of one UTC day as JSON lines (checksums verified)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--customer", required=True, help="the customer id")
        parser.add_argument("--day", required=True, help="YYYY-MM-DD (UTC)")

    def handle(self, *args: object, customer: str, day: str, **options: object) -> None:
        try:
            uuid.UUID(customer)
        except ValueError:
            raise CommandError(f"--customer must be a customer id (a UUID), not {customer!r}") from None
        try:
            for record in selectors.archived_records(customer_id=customer, day=date.fromisoformat(day)):
                self.stdout.write(json.dumps(record, separators=(",", ":")))
        except (ValueError, OSError, EOFError, zlib.error) as e:  # the archive file missing, not gzip, truncated, damaged
            raise CommandError(str(e)) from e
