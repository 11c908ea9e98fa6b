"""A real Postgres outage: resizes keep succeeding while PostgreSQL is stopped, their usage records
wait in the worker's spool, and once it is started again every record lands, exactly once.

Stops and starts the machine's PostgreSQL cluster, so it is excluded from `make test`:

    .venv/bin/python -m pytest -m chaos tests/metering/test_chaos.py -s
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from metering import services
from metering.models import BillingPeriod, UsageRecord
from tests.conftest import WORKER_SPOOL_DIR, corpus
from tests.test_e2e import key, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.django_db(transaction=True),
              pytest.mark.usefixtures("worker")]

# The newest installed cluster, as scripts/services.sh starts it (Debian 12 ships 15, 13 ships 17).
CLUSTER = [max((p.name for p in Path("/etc/postgresql").iterdir()), key=lambda v: [int(x) for x in v.split(".")],
               default="15"), "main"]


def pg(action: str) -> None:
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *CLUSTER, action], check=True, timeout=120)


def pg_online() -> bool:
    out = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True).stdout
    return any(line.split()[:2] == CLUSTER and "online" in line for line in out.splitlines())


def resize_all(http: httpx.Client, n: int, tag: str) -> list[str]:
    jobs = []
    for i in range(n):
        response = http.post("/v1/resize?width=96", content=corpus(f"photo-256k-{i % 4}.jpg"),
                             headers={"Idempotency-Key": f"{tag}-{i}"})
        assert response.status_code == 200, (tag, i, response.status_code, response.text[:300])
        jobs.append(response.headers["location"].rsplit("/", 1)[-1])
        if i % 3 == 0:  # a client retry of the same request: the same job, never a second record
            again = http.post("/v1/resize?width=96", content=corpus(f"photo-256k-{i % 4}.jpg"),
                              headers={"Idempotency-Key": f"{tag}-{i}"})
            assert again.headers["location"].rsplit("/", 1)[-1] == jobs[-1]
    return jobs


def records_of(job_ids: list[str]) -> int:
    connection.close()  # the test's own connection died with the server
    return UsageRecord.objects.filter(id__in=job_ids).count()


def test_postgres_stopped_for_a_while_loses_and_doubles_no_record(server, key, standard_plan):  # noqa: F811
    http = httpx.Client(base_url=server, timeout=30, headers={"Authorization": f"Bearer {key}"})
    deadline = time.monotonic() + 15  # a new key reaches the API processes' snapshots within seconds
    while http.get("/v1/usage").status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.2)
    before = resize_all(http, 10, "before")
    deadline = time.monotonic() + 10
    while records_of(before) < len(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert records_of(before) == len(before)  # shipped within about a second, as usual
    outage_seconds = 15.0
    stopped_at = time.monotonic()
    pg("stop")
    try:
        assert not pg_online()
        during = resize_all(http, 30, "during")
        spooled = sum(path.read_bytes().count(b"\n") for path in WORKER_SPOOL_DIR.glob("*.jsonl"))
        time.sleep(max(0.0, outage_seconds - (time.monotonic() - stopped_at)))
    finally:
        pg("start")
    restarted_at = time.monotonic()
    assert pg_online()
    after = resize_all(http, 10, "after")

    jobs = before + during + after
    assert len(set(jobs)) == len(jobs) == 50
    deadline = time.monotonic() + 90  # the shipper backs off to at most ~30 s between attempts
    while records_of(jobs) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    landed_after = time.monotonic() - restarted_at
    assert records_of(jobs) == len(jobs)
    assert not list(WORKER_SPOOL_DIR.glob("*.jsonl"))
    customer_id = UsageRecord.objects.get(id=jobs[0]).customer_id
    assert UsageRecord.objects.filter(customer_id=customer_id).count() == 50

    services.usage_rollup()
    start = UsageRecord.objects.get(id=jobs[0]).event_time.date().replace(day=1)
    services.billing_run(today=start.replace(year=start.year + 1))
    period = BillingPeriod.objects.get(customer_id=customer_id, start=start)
    assert period.lines.get(axis="images").quantity == 50
    print(f"\nchaos: outage {time.monotonic() - stopped_at - landed_after:.1f} s, {len(during)} resizes "
          f"during it (all 200), {spooled} records waiting in the worker's spool at the end of it, all "
          f"{len(jobs)} records in Postgres {landed_after:.1f} s after the restart, 50 images billed once")
