"""`manage.py metering_reship_rejected [--no-ship]`: after fixing what made the staging table refuse
records, move this host's `<spool>/rejected/` back into the spool and ship it."""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from metering import services
from metering.spool import ShipError, reship_rejected


class Command(BaseCommand):
    help = ("Move the records the staging table refused (<METERING_SPOOL_DIR>/rejected/) back into the spool "
            "and ship them; what the table still refuses is set aside again.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--no-ship", action="store_true",
                            help="only move them; the shipper threads ship them within a second")

    def handle(self, *args: object, no_ship: bool, **options: object) -> None:
        moved = reship_rejected(Path(settings.METERING_SPOOL_DIR))
        result = {"moved": len(moved)}
        if not no_ship:
            try:
                result["inserted"] = services.usage_ship()
            except ShipError as e:
                raise CommandError(f"{len(moved)} file(s) moved back into the spool, not shipped yet: {e}") from e
        self.stdout.write(json.dumps(result))
