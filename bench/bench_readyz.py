"""What one `/readyz` costs the API process, in-process through Django's test client against the running
PostgreSQL and RabbitMQ: wall time and the process's CPU per check (every thread: the check's own probes
run on threads of their own), and the TCP connections the checks opened (to PostgreSQL and RabbitMQ:
the host's count, so on a quiet machine).

    .venv/bin/python bench/bench_readyz.py [--checks 200]

Compare two commits by running it in a worktree of each (HAProxy asks each node every 2 s; a process
sees a share of those).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tcp_connects() -> int:
    """The host's TCP connections opened so far (`ActiveOpens` in /proc/net/snmp): run on a quiet machine."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(lines[1][lines[0].index("ActiveOpens")])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checks", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.test import Client

    client = Client()
    deadline = time.monotonic() + 30
    while client.get("/readyz").status_code != 200:  # warm-up: the identity snapshot, the probes' first rounds
        if time.monotonic() > deadline:
            sys.exit(f"/readyz is not 200: {client.get('/readyz').content!r}")
        time.sleep(0.2)
    before = tcp_connects()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.checks):
        client.get("/readyz")
    wall, cpu = (time.perf_counter() - wall) / args.checks, (time.process_time() - cpu) / args.checks
    opened = (tcp_connects() - before) / args.checks
    print(f"/readyz: {wall * 1000:.2f} ms wall, {cpu * 1000:.2f} ms CPU (all threads of this process), "
          f"{opened:.2f} TCP connections opened per check ({args.checks} checks)")


if __name__ == "__main__":
    main()
