"""`manage.py metering_run ship|reship|rollup|billing|archive`: run one metering job now (beat runs the
last three). `reship`: after fixing what made the staging table refuse records, move this host's
`<spool>/rejected/` back into the spool and ship it."""
from __future__ import annotations

import json
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from metering import services
from metering.spool import ShipError, reship_rejected


def _reship() -> dict[str, int]:
    """The records the table refused, back into the spool and shipped; what it still refuses is set aside again."""
    moved = reship_rejected(Path(settings.METERING_SPOOL_DIR))
    try:
        return {"moved": len(moved), "inserted": services.usage_ship()}
    except ShipError as e:
        raise ShipError(f"{len(moved)} file(s) moved back into the spool, not shipped yet: {e}") from e


class Command(BaseCommand):
    help = ("Run one metering job once: ship this host's spool, re-ship the records it set aside in rejected/, "
            "roll usage up, bill, or archive old records.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("job", choices=["ship", "reship", "rollup", "billing", "archive"])

    def handle(self, *args: object, job: str, **options: object) -> None:
        try:
            result = {
                "ship": lambda: {"records": services.usage_ship()},
                "reship": _reship,
                "rollup": services.usage_rollup,
                "billing": services.billing_run,
                "archive": services.usage_archive,
            }[job]()
        except ShipError as e:
            raise CommandError(str(e)) from e
        except DatabaseError as e:  # Postgres away: a sentence, not a traceback (ship said so already)
            raise CommandError(f"{job} failed: the database is unavailable ({type(e).__name__}: "
                               f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})") from e
        self.stdout.write(json.dumps(result, default=str))
