"""Long-term storage: old raw records leave the staging table only as verified, compressed files per
customer and day, and read back unchanged."""
from __future__ import annotations

import gzip
import io
import json
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import call_command

from metering import services
from metering.archive import DirectoryArchive
from metering.models import ArchiveFile, UsageRecord
from tests.metering.conftest import insert, usage

pytestmark = pytest.mark.django_db


@pytest.fixture
def archive_dir(settings, tmp_path):
    settings.METERING_ARCHIVE_URL = f"file://{tmp_path / 'archive'}"
    return tmp_path / "archive"


def old_day(settings, extra: int) -> datetime:
    day = datetime.now(timezone.utc) - timedelta(days=settings.METERING_ARCHIVE_AFTER_DAYS + extra)
    return day.replace(hour=12, minute=0, second=0, microsecond=0)


def read_back(customer_id, day) -> list[dict]:
    out = io.StringIO()
    call_command("usage_archive_read", customer=str(customer_id), day=day.date().isoformat(), stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_old_records_move_to_verified_files_and_read_back_unchanged(settings, archive_dir):
    customer = uuid.uuid4()
    d1, d2 = old_day(settings, 2), old_day(settings, 1)
    day1 = [usage(customer, at=d1 + timedelta(minutes=i)) for i in range(3)]
    insert(*day1, *[usage(customer, at=d2) for _ in range(2)], usage(customer))
    result = services.usage_archive()
    assert result["files"] >= 2 and result["records"] >= 5
    assert UsageRecord.objects.filter(customer_id=customer).count() == 1  # the recent one stays
    files = ArchiveFile.objects.filter(customer_id=customer).order_by("day")
    assert [(f.day, f.records) for f in files] == [(d1.date(), 3), (d2.date(), 2)]
    stored = archive_dir / files[0].key
    assert stored.name.endswith(".jsonl.gz") and f"/{customer}/{d1:%Y/%m/%d}/" in str(stored)
    assert gzip.decompress(stored.read_bytes()).count(b"\n") == 3

    back = sorted(read_back(customer, d1), key=lambda r: r["event_time"])
    assert [r["id"].replace("-", "") for r in back] == [r["id"] for r in day1]
    assert {(r["input_bytes"], r["output_megapixels"], r["cpu_seconds"]) for r in back} == {(250000, "0.020000", "0.007000")}
    assert services.usage_archive() == {"files": 0, "records": 0}  # nothing left to do

    # A record of that day that arrives even later gets a file of its own; the day reads back whole.
    insert(usage(customer, at=d1))
    services.usage_archive()
    assert len(read_back(customer, d1)) == 4 and ArchiveFile.objects.filter(customer_id=customer).count() == 3


def test_a_big_day_goes_in_bounded_files(settings, archive_dir, monkeypatch):
    """A customer's day was read whole into memory (tens of millions of rows at the design's rate):
    it goes in files of ARCHIVE_FILE_RECORDS, each verified and its rows deleted before the next."""
    monkeypatch.setattr(services, "ARCHIVE_FILE_RECORDS", 4)
    customer = uuid.uuid4()
    day = old_day(settings, 1)
    records = [usage(customer, at=day + timedelta(seconds=i)) for i in range(10)]
    insert(*records)
    assert services.usage_archive() == {"files": 3, "records": 10}
    files = ArchiveFile.objects.filter(customer_id=customer).order_by("created_at", "id")
    assert [f.records for f in files] == [4, 4, 2]
    back = read_back(customer, day)
    assert [r["id"].replace("-", "") for r in back] == [r["id"] for r in records]  # in time order
    assert not UsageRecord.objects.filter(customer_id=customer).exists()


class CorruptingArchive(DirectoryArchive):
    """A store that loses a byte: what verification is for."""

    def get(self, key: str) -> bytes:
        return gzip.compress(gzip.decompress(super().get(key))[:-2] + b"\n")


def test_records_stay_when_the_file_does_not_read_back(settings, archive_dir, monkeypatch):
    customer = uuid.uuid4()
    insert(*[usage(customer, at=old_day(settings, 1)) for _ in range(3)])
    monkeypatch.setattr(services, "archive_store", lambda: CorruptingArchive(archive_dir))
    with pytest.raises(services.ArchiveVerifyError):
        services.usage_archive()
    assert UsageRecord.objects.filter(customer_id=customer).count() == 3
    assert not ArchiveFile.objects.filter(customer_id=customer).exists()


def test_reading_the_archive_with_bad_input_is_a_clear_command_error(settings, archive_dir):
    from django.core.management.base import CommandError

    customer = uuid.uuid4()
    day = old_day(settings, 1)
    insert(usage(customer, at=day))
    services.usage_archive()
    with pytest.raises(CommandError, match="UUID"):
        call_command("usage_archive_read", customer="abc", day=day.date().isoformat(), stdout=io.StringIO())
    files = [path for path in archive_dir.rglob("*") if path.is_file()]
    for damage in (lambda data: data[: len(data) // 2],  # truncated: EOFError from gzip
                   lambda data: data[:10] + bytes(b ^ 0xFF for b in data[10:])):  # damaged: zlib.error
        for path in files:
            path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(CommandError):
            read_back(customer, day)
    for path in files:
        path.unlink()  # the file an ArchiveFile row points at is gone
    with pytest.raises(CommandError):
        read_back(customer, day)
