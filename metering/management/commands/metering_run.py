"""`manage.py metering_run ship|rollup|billing|archive`: run one metering job now (beat runs the last three)."""
from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import services
from metering.spool import ShipError


class Command(BaseCommand):
    help = "Run one metering job once: ship this host's spool, roll usage up, bill, or archive old records."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job", choices=["ship", "rollup", "billing", "archive"])

    def handle(self, *args: object, job: str, **options: object) -> None:
        try:
            result = {
                "ship": lambda: {"records": services.usage_ship()},
                "rollup": services.usage_rollup,
                "billing": services.billing_run,
                "archive": services.usage_archive,
            }[job]()
        except ShipError as e:
            raise CommandError(str(e)) from e
        self.stdout.write(json.dumps(result, default=str))
