"""The cost of authenticating one request: the data plane's in-memory snapshot against a database
lookup (what every request would pay without it), and the snapshot's memory per credential.

    .venv/bin/python bench/bench_auth.py [--keys 2000] [--calls 20000]

Uses the running PostgreSQL (database `resizer`); creates its own customers, named bench-auth-*.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import percentile  # noqa: E402
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    import django

    django.setup()
    from django.conf import settings

    settings.AUTH_SYNC_IN_BACKGROUND = False
    settings.AUTH_SNAPSHOT_PATH = ""
    from identity.dataplane import Credential, credential_cache
    from identity.keys import key_matches, key_prefix
    from identity.models import ApiKey, Customer
    from identity.services import api_key_create, customer_create

    keys = []
    customer = customer_create(name=f"bench-auth-{os.getpid()}")
    for _ in range(args.keys):
        keys.append(api_key_create(customer=customer)[1])
    cache = credential_cache()
    started = time.perf_counter()
    cache.sync(full=True)
    full_sync_ms = (time.perf_counter() - started) * 1000
    total_credentials = len(cache._by_prefix)

    def db_lookup(key: str) -> None:
        row = (ApiKey.objects.select_related("customer")
               .filter(prefix=key_prefix(key), revoked_at__isnull=True, customer__status=Customer.Status.ACTIVE).first())
        assert row is not None and key_matches(key, row.secret_hash)

    rows = []
    for name, fn, calls in (("snapshot in memory (the request path)", cache.authenticate, args.calls),
                            ("database lookup by prefix + HMAC", db_lookup, min(args.calls, 5000))):
        for key in keys[:200]:
            fn(key)  # warm
        samples = []
        for i in range(calls):
            key = keys[i % len(keys)]
            t = time.perf_counter_ns()
            fn(key)
            samples.append((time.perf_counter_ns() - t) / 1000)
        rows.append((name, samples))

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    synthetic = {f"p{i:011d}": Credential(key_id=f"{i:032x}", customer_id=f"{i // 3:032x}", secret_hash="a" * 64,
                                           scopes=("resize", "jobs", "usage"), expires_at=None, customer_active=True,
                                           rate_per_second=50.0, burst=100, monthly_quota=None)
                 for i in range(100_000)}
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    del synthetic

    print(f"\n{total_credentials} credentials in the snapshot; full sync {full_sync_ms:.0f} ms\n")
    print("| authentication | calls | p50 µs | p99 µs | mean µs |")
    print("|---|---|---|---|---|")
    for name, samples in rows:
        print(f"| {name} | {len(samples)} | {statistics.median(samples):.1f} | {percentile(samples, 99):.1f} "
              f"| {statistics.fmean(samples):.1f} |")
    print(f"\nsnapshot memory: {grown / 100_000:.0f} bytes per credential "
          f"({grown / 2**20:.0f} MiB for 100,000 keys)")
    customer.delete()


if __name__ == "__main__":
    main()
