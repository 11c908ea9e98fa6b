"""The metering staging path and the rollup, measured on this machine against the real PostgreSQL.

1. spool append + fsync: what a worker pays per job before announcing it (latency and records/s);
2. shipping spooled records to the staging table (COPY + INSERT ... ON CONFLICT), several batch
   sizes, and the same batches shipped again (all conflicts);
3. the hourly + daily rollup of 100k, 300k and 1M raw records (generated in the database): the
   first run over all of them, a repeated run (nothing new), and a run after 10k new records (a
   beat run in steady state), to show how its cost grows with the record count.

Runs in its own database (`<DATABASE_URL's name>_bench`, created and migrated here), never the real one.

    .venv/bin/python bench/bench_metering.py [--ship 50000] [--sizes 100000,300000,1000000]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import percentile  # noqa: E402
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")


def _bench_database() -> str:
    """Point DATABASE_URL at a bench database (created if missing) before Django reads it."""
    import dj_database_url
    import psycopg

    url = os.environ.get("DATABASE_URL", "postgres://postgres:postgres@127.0.0.1:5432/resizer")
    config = dj_database_url.parse(url)
    name = f"{config['NAME']}_bench"
    with psycopg.connect(host=config["HOST"], port=config["PORT"] or 5432, user=config["USER"],
                         password=config["PASSWORD"] or None, dbname="postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = url.rsplit("/", 1)[0] + "/" + name
    return name


def record(customer: uuid.UUID, at: datetime) -> dict:
    return {"id": uuid.uuid4().hex, "customer_id": str(customer), "key_id": str(uuid.uuid4()), "request_id": "bench",
            "event_time": at.isoformat(), "outcome": "succeeded", "error_code": "", "attempts": 1,
            "input_format": "jpeg", "input_width": 1280, "input_height": 960, "input_bytes": 262_144,
            "input_megapixels": "1.2288", "output_format": "jpeg", "output_width": 256, "output_height": 192,
            "output_bytes": 9_000, "output_megapixels": "0.049152", "cpu_seconds": "0.0071", "wall_seconds": "0.021"}


def truncate() -> None:
    from django.db import connection

    with connection.cursor() as c:
        c.execute("TRUNCATE metering_usagerecord, metering_usagerollup, metering_watermark")


def bench_append(n: int) -> tuple[list[float], float]:
    from metering.spool import Spool

    directory = Path(tempfile.mkdtemp(prefix="bench-spool-", dir=Path(__file__).resolve().parent.parent / "var"))
    spool = Spool(directory, segment_records=1000)
    customer, now = uuid.uuid4(), datetime.now(timezone.utc)
    records = [record(customer, now) for _ in range(n)]
    latencies = []
    start = time.perf_counter()
    for r in records:
        t = time.perf_counter()
        spool.append(r)
        latencies.append((time.perf_counter() - t) * 1000)
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory)
    return latencies, n / elapsed


def bench_ship(n: int, batch: int) -> tuple[float, float]:
    """Records/s shipping n spooled records in batches of `batch`; then the same segments again."""
    from metering.services import staging_conninfo
    from metering.spool import Shipper, Spool

    truncate()
    directory = Path(tempfile.mkdtemp(prefix="bench-ship-", dir=Path(__file__).resolve().parent.parent / "var"))
    spool = Spool(directory, segment_records=min(batch, 1000))
    customers = [uuid.uuid4() for _ in range(100)]
    now = datetime.now(timezone.utc)
    for i in range(n):
        spool.append(record(customers[i % len(customers)], now))
    spool._close()
    again = Path(shutil.copytree(directory, f"{directory}-again"))
    shipper = Shipper(directory, batch_records=batch)
    t = time.perf_counter()
    assert shipper.ship(conninfo=staging_conninfo()) == n
    first = n / (time.perf_counter() - t)
    t = time.perf_counter()
    assert Shipper(again, batch_records=batch).ship(conninfo=staging_conninfo()) == 0  # all there: none inserted
    second = n / (time.perf_counter() - t)
    shipper.close()
    shutil.rmtree(directory)
    shutil.rmtree(again)
    return first, second


GENERATE_SQL = """
INSERT INTO metering_usagerecord (id, customer_id, key_id, request_id, event_time, received_at, outcome,
    error_code, attempts, input_format, input_width, input_height, input_bytes, input_megapixels,
    output_format, output_width, output_height, output_bytes, output_megapixels, cpu_seconds, wall_seconds)
SELECT gen_random_uuid(), c.id, c.id, 'bench',
       now() - (random() * interval '24 hours'), now() - %(received_ago)s::interval,
       CASE WHEN random() < 0.01 THEN 'failed' ELSE 'succeeded' END, '', 1,
       'jpeg', 1280, 960, 200000 + (random() * 100000)::int, 1.2288,
       'jpeg', 256, 192, 9000, 0.049152, 0.005 + random() * 0.005, 0.02
FROM generate_series(1, %(n)s) g
JOIN (SELECT row_number() OVER () - 1 AS i, id FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, %(customers)s)) s) c
  ON c.i = g %% %(customers)s
"""


def bench_rollup(n: int, customers: int, increment: int) -> tuple[float, float, float, int]:
    """Seconds for: the first run over n records (all new), a repeated run (nothing new), and a run
    after `increment` new records arrived (what each beat run does in steady state)."""
    from django.db import connection

    from metering import services
    from metering.models import UsageRollup

    truncate()
    with connection.cursor() as c:
        # Received an hour ago: outside the next runs' look-back, as in a table that has been running.
        c.execute(GENERATE_SQL, {"n": n, "customers": customers, "received_ago": "1 hour"})
        c.execute("VACUUM ANALYZE metering_usagerecord")
    t = time.perf_counter()
    services.usage_rollup()
    first = time.perf_counter() - t
    t = time.perf_counter()
    services.usage_rollup()
    repeated = time.perf_counter() - t
    with connection.cursor() as c:
        c.execute(GENERATE_SQL, {"n": increment, "customers": customers, "received_ago": "0 seconds"})
    t = time.perf_counter()
    services.usage_rollup()
    incremental = time.perf_counter() - t
    days = UsageRollup.objects.filter(granularity="day")
    assert sum(days.values_list("images", flat=True)) + sum(days.values_list("failed_images", flat=True)) == n + increment
    return first, repeated, incremental, UsageRollup.objects.filter(granularity="hour").count()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--append", type=int, default=20_000)
    parser.add_argument("--ship", type=int, default=50_000)
    parser.add_argument("--sizes", default="100000,300000,1000000")
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--increment", type=int, default=10_000, help="new records before the last run")
    args = parser.parse_args()
    name = _bench_database()
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    print(f"database {name}; {os.cpu_count()} cores\n")

    latencies, rate = bench_append(args.append)
    print("| spool append + fsync (one process) | p50 ms | p99 ms | max ms | records/s |")
    print("|---|---|---|---|---|")
    print(f"| {args.append} records | {statistics.median(latencies):.3f} | {percentile(latencies, 99):.3f} "
          f"| {max(latencies):.3f} | {rate:,.0f} |\n")

    print(f"| ship {args.ship} spooled records to Postgres, batch size | records/s | the same batches again (all conflicts), records/s |")
    print("|---|---|---|")
    for batch in (100, 1000, 10_000):
        first, second = bench_ship(args.ship, batch)
        print(f"| {batch} | {first:,.0f} | {second:,.0f} |")

    print(f"\n| raw records ({args.customers} customers, 24 h) | hour windows | first rollup s | records/s | "
          f"repeated, nothing new, s | after {args.increment:,} new records, s |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        first, repeated, incremental, windows = bench_rollup(n, args.customers, args.increment)
        print(f"| {n:,} | {windows:,} | {first:.2f} | {n / first:,.0f} | {repeated:.3f} | {incremental:.2f} |")
    truncate()


if __name__ == "__main__":
    main()
