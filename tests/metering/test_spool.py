"""The spool and its shipper against the real Postgres: every appended record lands exactly once,
whether a batch is shipped twice, the staging table is away for a while, or a writer is killed."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from metering.models import UsageRecord
from metering.services import staging_conninfo
from metering.spool import Shipper, ShipError, ShipperThread, Spool
from tests.conftest import ROOT
from tests.metering.conftest import usage

# The shipper commits on its own connection: these tests need committed, visible rows.
pytestmark = pytest.mark.django_db(transaction=True)

UNREACHABLE = "host=127.0.0.1 port=1 dbname=resizer user=postgres"  # a Postgres that is not there


def count(customer_id) -> int:
    return UsageRecord.objects.filter(customer_id=customer_id).count()


def test_n_records_land_once_even_when_a_batch_is_shipped_twice(spool_dir):
    customer = uuid.uuid4()
    spool = Spool(spool_dir, segment_records=40)
    records = [usage(customer) for _ in range(100)]
    for record in records:
        spool.append(record)
    copy = Path(shutil.copytree(spool_dir, spool_dir.with_name(spool_dir.name + "-copy")))
    assert len(list(copy.glob("*.jsonl"))) == 3  # rotated at 40 records

    assert Shipper(spool_dir, batch_records=50).ship(conninfo=staging_conninfo()) == 100
    assert count(customer) == 100 and not list(spool_dir.glob("*.jsonl"))
    # The same batches again (a shipper that died after its commit, before deleting them): a no-op,
    # and counted as such (ship() counts the rows it inserted).
    assert Shipper(copy, batch_records=1000).ship(conninfo=staging_conninfo()) == 0
    assert count(customer) == 100
    row = UsageRecord.objects.get(id=records[0]["id"])
    assert (row.input_bytes, str(row.output_megapixels), row.outcome) == (250_000, "0.020000", "succeeded")


def test_staging_away_keeps_every_record_in_the_spool_until_it_returns(spool_dir):
    customer = uuid.uuid4()
    spool = Spool(spool_dir, segment_records=1000)
    for _ in range(30):
        spool.append(usage(customer))
    shipper = Shipper(spool_dir, batch_records=1000)
    with pytest.raises(ShipError):
        shipper.ship(conninfo=UNREACHABLE)
    assert count(customer) == 0 and shipper.pending() == 1
    for _ in range(20):  # the service keeps appending while the staging table is away
        spool.append(usage(customer))
    assert shipper.ship(conninfo=staging_conninfo()) == 50
    assert count(customer) == 50 and shipper.pending() == 0


def test_the_background_shipper_recovers_without_a_restart(spool_dir):
    customer = uuid.uuid4()
    database = {"up": False}
    spool = Spool(spool_dir, segment_records=1000)
    ShipperThread(Shipper(spool_dir, batch_records=1000), interval=0.05, wake=spool.rotated,
                  conninfo=lambda: staging_conninfo() if database["up"] else UNREACHABLE)
    for _ in range(25):
        spool.append(usage(customer))
    time.sleep(0.5)  # several failed attempts
    assert count(customer) == 0
    database["up"] = True
    deadline = time.monotonic() + 15  # the thread is backing off: at most ~0.05 * 2^n with jitter
    while count(customer) < 25 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count(customer) == 25


def test_writers_racing_shippers_lose_and_duplicate_nothing(spool_dir):
    """Two writer threads (each its own Spool, as two processes would be) against two shippers that
    keep taking segments from under them."""
    customer = uuid.uuid4()
    stop = threading.Event()
    shipped = []

    def ship_loop() -> None:
        shipper = Shipper(spool_dir, batch_records=37)
        while not stop.is_set():
            shipped.append(shipper.ship(conninfo=staging_conninfo()))
        shipped.append(shipper.ship(conninfo=staging_conninfo()))
        shipper.close()

    def write(n: int) -> None:
        spool = Spool(spool_dir, segment_records=25)
        for _ in range(n):
            spool.append(usage(customer))

    shippers = [threading.Thread(target=ship_loop) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(400,)) for _ in range(2)]
    for t in shippers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in shippers:
        t.join()
    Shipper(spool_dir, batch_records=1000).ship(conninfo=staging_conninfo())
    assert count(customer) == 800
    assert not list(spool_dir.glob("*.jsonl"))


_WRITER = """
import sys, uuid
from pathlib import Path
from metering.spool import Spool
spool = Spool(Path(sys.argv[1]), segment_records=50)
while True:
    record_id = uuid.uuid4().hex
    spool.append({"id": record_id, "customer_id": sys.argv[2], "event_time": "2026-11-01T10:00:00Z",
                  "outcome": "succeeded", "input_bytes": 1000})
    print(record_id, flush=True)  # acknowledged: append() returned, so the record is on disk
"""


def test_a_writer_killed_mid_stream_loses_nothing_it_acknowledged(spool_dir):
    customer = uuid.uuid4()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(spool_dir), str(customer)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) == 300:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    acknowledged += [line.strip() for line in proc.stdout if line.strip()]
    # Its segments are still there, and its dead process holds no lock on them.
    Shipper(spool_dir, batch_records=1000).ship(conninfo=staging_conninfo())
    stored = {str(i).replace("-", "") for i in UsageRecord.objects.filter(customer_id=customer).values_list("id", flat=True)}
    assert set(acknowledged) <= stored
    assert len(stored) - len(acknowledged) <= 1  # at most the record in flight when it died


def test_a_torn_last_line_is_dropped_and_a_bad_record_set_aside(spool_dir):
    customer = uuid.uuid4()
    good, bad = usage(customer), {**usage(customer), "customer_id": "not-a-uuid"}
    import json

    # A number past a float's range in an integer column (OverflowError) and a record nested past
    # Python's recursion limit (RecursionError) stopped the segment, and every one after it, for good.
    overflow = json.dumps({**usage(customer), "input_width": 1}).replace('"input_width": 1', '"input_width": 1e400')
    nested = '{"id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (spool_dir / "dead-1-x-000001.jsonl").write_bytes(
        (json.dumps(good) + "\n" + json.dumps(bad) + "\n" + overflow + "\n" + nested + "\n"
         + json.dumps(usage(customer))[:40]).encode())
    assert Shipper(spool_dir, batch_records=1000).ship(conninfo=staging_conninfo()) == 1
    assert count(customer) == 1
    rejected = (spool_dir / "rejected" / "dead-1-x-000001.jsonl").read_text()
    assert rejected.count("not-a-uuid") == 1 and "1e400" in rejected and rejected.count("\n") == 3
    assert not (spool_dir / "dead-1-x-000001.jsonl").exists()


def test_one_unreadable_segment_does_not_stop_the_segments_after_it(spool_dir):
    """An open or read that failed (a bad sector, permissions; here a directory where a segment should
    be) escaped ship(): segments are taken in name order, and every one after it waited forever."""
    import json

    customer = uuid.uuid4()
    (spool_dir / "a-1-x-000001.jsonl").mkdir()  # cannot be read as a segment
    (spool_dir / "b-1-x-000001.jsonl").write_bytes((json.dumps(usage(customer)) + "\n").encode())
    shipper = Shipper(spool_dir, batch_records=1)
    assert shipper.ship(conninfo=staging_conninfo()) == 1
    shipper.close()
    assert count(customer) == 1
    assert (spool_dir / "bad" / "a-1-x-000001.jsonl").exists()  # set aside for an operator


def test_a_reject_that_cannot_be_written_does_not_stop_the_other_segments(spool_dir):
    """The reject file is written after the commit: its failure (here `rejected` is a file, not a
    directory) aborted the loop, and the segments after it were never shipped."""
    import json

    customer = uuid.uuid4()
    (spool_dir / "rejected").write_bytes(b"")  # mkdir(exist_ok=True) raises FileExistsError
    (spool_dir / "a-1-x-000001.jsonl").write_bytes(
        (json.dumps(usage(customer)) + "\n" + json.dumps({**usage(customer), "customer_id": "x"}) + "\n").encode())
    (spool_dir / "b-1-x-000001.jsonl").write_bytes((json.dumps(usage(customer)) + "\n").encode())
    shipper = Shipper(spool_dir, batch_records=1)
    assert shipper.ship(conninfo=staging_conninfo()) == 2
    shipper.close()
    assert count(customer) == 2
    assert (spool_dir / "a-1-x-000001.jsonl").exists()  # kept: its bad record is not set aside yet
    assert not (spool_dir / "b-1-x-000001.jsonl").exists()


@pytest.mark.e2e
def test_a_worker_that_runs_no_job_ships_the_segments_left_in_its_spool():
    """The shipper thread started with a process's first record: segments a killed process left
    stayed in the spool while no job reached the host (a quiet night, a drained or scaled-in host).
    Worker children now ship from their start; this worker never runs a job."""
    import json

    from tests.conftest import STAGING_DIR
    from tests.processes import own_worker

    customer = uuid.uuid4()
    with own_worker("leftovers") as worker:
        spool = STAGING_DIR.parent / f"{worker.queue}-spool"
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "gone-1-x-000001.jsonl").write_bytes((json.dumps(usage(customer)) + "\n").encode())
        deadline = time.monotonic() + 30
        while count(customer) == 0:
            assert time.monotonic() < deadline, worker.log_text()[-2000:]
            time.sleep(0.2)
    assert not (spool / "gone-1-x-000001.jsonl").exists()


def test_a_row_the_table_refuses_whose_reject_cannot_be_written_keeps_only_its_segment(spool_dir):
    """A row Postgres refuses (a NUL byte in a text column passes the record's own checks) is found by
    inserting one by one; its reject was written there, unguarded: with `rejected` unwritable the
    OSError aborted ship(), and every later segment waited forever."""
    import json

    customer = uuid.uuid4()
    (spool_dir / "rejected").write_bytes(b"")  # not a directory: the reject cannot be written
    refused = {**usage(customer), "request_id": "a\u0000b"}
    (spool_dir / "a-1-x-000001.jsonl").write_bytes(
        (json.dumps(usage(customer)) + "\n" + json.dumps(refused) + "\n").encode())
    (spool_dir / "b-1-x-000001.jsonl").write_bytes((json.dumps(usage(customer)) + "\n").encode())
    shipper = Shipper(spool_dir, batch_records=1000)
    shipper.ship(conninfo=staging_conninfo())
    shipper.close()
    assert count(customer) == 2
    assert (spool_dir / "a-1-x-000001.jsonl").exists() and not (spool_dir / "b-1-x-000001.jsonl").exists()


def test_a_shipment_stalled_before_its_commit_is_aborted_shipped_again_and_rolled_up(spool_dir, settings, monkeypatch):
    """received_at is the INSERT's clock and the rollup looks back METERING_LOOKBACK_SECONDS before its
    watermark: a shipper paused between its INSERT and its COMMIT (a frozen container, a partition)
    committed rows older than the look-back, and no rollup ever counted them. The transaction now
    has an idle timeout: it is aborted, its segment stays, and the next shipment is rolled up.
    (Scaled down: a 1 s look-back, a 0.5 s idle timeout, a 3 s stall.)"""
    import psycopg

    from metering import services
    from metering.models import UsageRollup

    settings.METERING_LOOKBACK_SECONDS = 1
    customer = uuid.uuid4()
    Spool(spool_dir, segment_records=1000).append(usage(customer))
    services.usage_rollup()  # a watermark exists before the shipment

    class StallAfterInsert(psycopg.Cursor):
        def execute(self, query, *args, **kwargs):
            result = super().execute(query, *args, **kwargs)
            if str(query).startswith("INSERT INTO metering_usagerecord"):
                for _ in range(2):  # rollups run while the shipment waits to commit
                    time.sleep(1.5)
                    services.usage_rollup()
            return result

    stalled = Shipper(spool_dir, batch_records=1000, idle_timeout=0.5)
    connect = stalled._connect

    def stalling_connect(conninfo):
        connection = connect(conninfo)
        connection.cursor_factory = StallAfterInsert
        return connection

    monkeypatch.setattr(stalled, "_connect", stalling_connect)
    try:
        with pytest.raises(ShipError):  # aborted by Postgres: the COMMIT failed
            stalled.ship(conninfo=staging_conninfo())
    finally:
        stalled.close()
    assert count(customer) == 0 and stalled.pending() == 1  # nothing committed; the segment stays
    shipper = Shipper(spool_dir, batch_records=1000)
    shipper.ship(conninfo=staging_conninfo())
    shipper.close()
    for _ in range(2):
        services.usage_rollup()
    assert count(customer) == 1 and shipper.pending() == 0
    assert UsageRollup.objects.filter(customer_id=customer, granularity="hour").values_list("images", flat=True)[0] == 1


@pytest.mark.parametrize("env", [
    {"METERING_LOOKBACK_SECONDS": "100"},  # under the default 60 + 60
    {"METERING_SHIP_IDLE_TIMEOUT_SECONDS": "250"},
])
def test_settings_refuse_a_look_back_shorter_than_a_shipment_may_take(env):
    import os

    proc = subprocess.run([sys.executable, "-c", "import controlplane.settings"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, **env})
    assert proc.returncode != 0 and "must exceed" in proc.stderr
    ok = subprocess.run([sys.executable, "-c", "import controlplane.settings"], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, "METERING_LOOKBACK_SECONDS": "121"})
    assert ok.returncode == 0, ok.stderr


class _Deploy:
    """Changes to the staging table, as a careless deploy would make them; `fix()` (or the test's end) undoes them."""

    def __init__(self) -> None:
        self.undo: list[str] = []

    def _run(self, sql: str) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute(sql)

    def __call__(self, sql: str, revert: str) -> None:
        self._run(sql)
        self.undo.append(revert)

    def fix(self) -> None:
        while self.undo:
            self._run(self.undo.pop())


@pytest.fixture
def deploy_change():
    deploy = _Deploy()
    yield deploy
    deploy.fix()


@pytest.mark.parametrize("records", [1, 3])
@pytest.mark.parametrize("change", [
    # As a Django migration adds a NOT NULL field: with a default for the rows there, then dropped.
    ("ALTER TABLE metering_usagerecord ADD COLUMN region text NOT NULL DEFAULT 'eu';"
     " ALTER TABLE metering_usagerecord ALTER COLUMN region DROP DEFAULT",
     "ALTER TABLE metering_usagerecord DROP COLUMN region"),
    ("ALTER TABLE metering_usagerecord ADD CONSTRAINT received_long_ago CHECK (received_at < '2000-01-01') NOT VALID",
     "ALTER TABLE metering_usagerecord DROP CONSTRAINT received_long_ago"),
], ids=["not-null-column", "check-no-record-passes"])
def test_a_table_that_refuses_every_record_keeps_the_spool_and_backs_off(spool_dir, deploy_change, change, records):
    """A refusal that is the table's, not the records': every record was sent to rejected/, the
    segments deleted, ship() counted them as shipped and the spool gauges read 0."""
    customer = uuid.uuid4()
    Spool(spool_dir, segment_records=1000).append(usage(customer))  # shipped before the deploy
    assert Shipper(spool_dir, batch_records=1000).ship(conninfo=staging_conninfo()) == 1
    deploy_change(*change)
    spool = Spool(spool_dir, segment_records=1000)
    for _ in range(records):
        spool.append(usage(customer))
    shipper = Shipper(spool_dir, batch_records=1000)
    with pytest.raises(ShipError, match="refuse"):
        shipper.ship(conninfo=staging_conninfo())
    assert count(customer) == 1 and shipper.pending() == 1
    assert not (spool_dir / "rejected").exists()
    shipper.close()
    deploy_change.fix()  # another deploy fixes the table: everything ships by itself
    assert shipper.ship(conninfo=staging_conninfo()) == records
    shipper.close()
    assert count(customer) == 1 + records and shipper.pending() == 0


def test_ship_counts_only_the_rows_it_inserted(spool_dir):
    """Rows the table refused (here a NUL byte, which passes the record's own checks) were counted as
    shipped."""
    import json

    customer = uuid.uuid4()
    refused = {**usage(customer), "request_id": "a\u0000b"}
    (spool_dir / "a-1-x-000001.jsonl").write_bytes(
        "".join(json.dumps(r) + "\n" for r in (usage(customer), refused, usage(customer))).encode())
    shipper = Shipper(spool_dir, batch_records=1000)
    assert shipper.ship(conninfo=staging_conninfo()) == 2
    shipper.close()
    assert count(customer) == 2
    assert (spool_dir / "rejected" / "a-1-x-000001.jsonl").read_text().count("\n") == 1


def test_a_batch_of_only_bad_records_is_set_aside_and_the_spool_goes_on(spool_dir):
    """Found by review: once the table had taken an ordinary record, a batch whose records were all
    refused one by one still raised ShipError and stayed; shipped in name order, it came first on
    every try, and nothing after it ever shipped."""
    import json

    customer = uuid.uuid4()
    (spool_dir / "a-1-x-000001.jsonl").write_bytes(
        "".join(json.dumps({**usage(customer), "request_id": "a\u0000b"}) + "\n" for _ in range(2)).encode())
    (spool_dir / "b-1-x-000001.jsonl").write_bytes((json.dumps(usage(customer)) + "\n").encode())
    shipper = Shipper(spool_dir, batch_records=2)
    try:
        assert shipper.ship(conninfo=staging_conninfo()) == 1
    finally:
        shipper.close()
    assert count(customer) == 1 and shipper.pending() == 0
    assert (spool_dir / "rejected" / "a-1-x-000001.jsonl").read_text().count("\n") == 2


def test_records_set_aside_are_counted_by_the_spool_gauges(spool_dir):
    import json

    from controlplane.metrics import SpoolCollector

    (spool_dir / "rejected").mkdir()
    (spool_dir / "rejected" / "a-1-x-000001.jsonl").write_text(json.dumps(usage(uuid.uuid4())) + "\n{}\n")
    (spool_dir / "bad").mkdir()
    (spool_dir / "bad" / "b-1-x-000001.jsonl").mkdir()  # unreadable: counted as one
    (spool_dir / "bad" / "c-1-x-000001.jsonl").write_text("{}\n{}\n{}\n")
    samples = {(f.name, tuple(s.labels.items())): s.value for f in SpoolCollector(lambda: str(spool_dir)).collect()
               for s in f.samples}
    assert samples[("resizer_metering_spool_set_aside_records", (("place", "rejected"),))] == 2
    assert samples[("resizer_metering_spool_set_aside_records", (("place", "bad"),))] == 4
    assert samples[("resizer_metering_spool_segments", ())] == 0


def test_rejected_records_are_reshipped_by_the_management_command(spool_dir, settings, deploy_change):
    """After the cause is fixed, `manage.py metering_run reship` moves rejected/ back into the spool
    and ships it; what the table still refuses is set aside again."""
    import io
    import json

    from django.core.management import call_command

    customer = uuid.uuid4()
    deploy_change("ALTER TABLE metering_usagerecord ADD CONSTRAINT no_png CHECK (input_format <> 'png') NOT VALID",
                  "ALTER TABLE metering_usagerecord DROP CONSTRAINT no_png")
    (spool_dir / "a-1-x-000001.jsonl").write_bytes(
        "".join(json.dumps(usage(customer, input_format=f)) + "\n" for f in ("png", "jpeg", "png")).encode()
        + (json.dumps({**usage(customer), "customer_id": "x"}) + "\n").encode())
    assert Shipper(spool_dir, batch_records=1000).ship(conninfo=staging_conninfo()) == 1
    assert (spool_dir / "rejected" / "a-1-x-000001.jsonl").read_text().count("\n") == 3
    deploy_change.fix()
    settings.METERING_SPOOL_DIR = str(spool_dir)
    out = io.StringIO()
    call_command("metering_run", "reship", stdout=out)
    assert json.loads(out.getvalue()) == {"moved": 1, "inserted": 2}
    assert count(customer) == 3
    # The record no table takes is set aside again, under its new segment's name.
    assert [p.read_text().count("\n") for p in (spool_dir / "rejected").iterdir()] == [1]


@pytest.mark.parametrize("job", ["rollup", "billing", "archive"])
def test_metering_jobs_say_the_database_is_away_in_a_sentence(job):
    """With PostgreSQL unreachable, `metering_run ship` said so in a CommandError, and rollup, billing
    and archive printed a traceback (found by review)."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "manage.py", "metering_run", job], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DATABASE_URL": "postgres://nobody@127.0.0.1:1/none"})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"CommandError: {job} failed: the database is unavailable" in done.stderr
