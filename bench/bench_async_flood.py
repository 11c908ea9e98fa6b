"""Admission control against one customer's flood beside a quiet customer (ADR 0006, "The depth counts
this process's admissions since the last reading").

A stack of 2 API processes and one worker of 2 processes (bench/stack.py), default admission settings
(depth bound 25). For `--seconds` (20), one of:
- `async`: customer A's 8 closed-loop clients send `Prefer: respond-async` resizes of the 256 KB
  photos to 256 px, as fast as they are answered, honouring Retry-After;
- `sync`: customer A's 12 closed-loop clients send the same synchronously;
- `alone`: the asynchronous flood without the quiet customer;
- `slow`: 32 clients (16 of A's, 16 of B's) send `Prefer: respond-async` resizes of the 900 KB photo
  to 800 px, each body trickled in 64 KB pieces 25 ms apart (~0.35 s an upload: admission comes before
  the body is read, so each job is admitted well before it is published), with no quiet customer;
and (except `alone`) customer B, the quiet one, sends one synchronous resize every 200 ms. The queue's
ready count is read from RabbitMQ every 0.1 s (a passive declare). Reported per scenario: the answers
of each customer by status and code, their p50/p99 (of 200s and 202s), and the queue's depth
p50/p90/max.

    .venv/bin/python bench/bench_async_flood.py [--scenarios async,alone,sync] [--seconds 20]

Uses the running PostgreSQL and RabbitMQ (private queue, staging and spool, bench customers in the
database of DATABASE_URL). Needs a quiet machine: everything shares its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench.loadgen import percentile  # noqa: E402
from bench.stack import stack  # noqa: E402
from tests.reliability.load import QueueDepth  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
PHOTOS = [(CORPUS / f"photo-256k-{i}.jpg").read_bytes() for i in range(4)]
BIG = (CORPUS / "photo-900k.jpg").read_bytes()


async def _trickle(data: bytes):  # type: ignore[no-untyped-def]
    for start in range(0, len(data), 65536):
        yield data[start:start + 65536]
        await asyncio.sleep(0.025)


async def _client(base: str, key: str, seconds: float, answers: list[tuple[int, str, float]], *,
                  asynchronous: bool, pause: float = 0.0, slow: bool = False) -> None:
    headers = {"Authorization": f"Bearer {key}", **({"Prefer": "respond-async"} if asynchronous else {})}
    if slow:
        headers["Content-Length"] = str(len(BIG))
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        while time.monotonic() < deadline:
            started = time.monotonic()
            url, data = (f"{base}/v1/resize?width=800", _trickle(BIG)) if slow else \
                (f"{base}/v1/resize?width=256", random.choice(PHOTOS))
            async with session.post(url, data=data, headers=headers) as r:
                body = await r.read()
                code = json.loads(body).get("code", "") if r.status >= 400 else ""
                answers.append((r.status, code, time.monotonic() - started))
                retry_after = r.headers.get("Retry-After", "") if r.status in (429, 503) else ""
            await asyncio.sleep(int(retry_after) if retry_after.isdigit() else pause)


def _summary(answers: list[tuple[int, str, float]]) -> dict:
    served = [seconds for status, _, seconds in answers if status in (200, 202)]
    return {"answers": len(answers),
            "by_code": dict(collections.Counter(f"{s} {c}".strip() for s, c, _ in answers)),
            "served_p50_ms": round(percentile(served, 50) * 1000) if served else None,
            "served_p99_ms": round(percentile(served, 99) * 1000) if served else None}


async def _load(base: str, keys: list[str], scenario: str, seconds: float) -> dict:
    flood: list[tuple[int, str, float]] = []
    quiet: list[tuple[int, str, float]] = []
    # `slow`: the flood is both customers' (16 clients each), so the processes' bound on requests in
    # flight (12 each), not one customer's slots (6 a process), limits the uploads at once.
    clients = [_client(base, keys[i % 2 if scenario == "slow" else 0], seconds, flood,
                       asynchronous=scenario != "sync", slow=scenario == "slow")
               for i in range({"sync": 12, "slow": 32}.get(scenario, 8))]
    if scenario not in ("alone", "slow"):
        clients.append(_client(base, keys[1], seconds, quiet, asynchronous=False, pause=0.2))
    await asyncio.gather(*clients)
    return {"flood": _summary(flood), **({"quiet": _summary(quiet)} if quiet else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="async,alone,sync")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    results = []
    for scenario in args.scenarios.split(","):
        with stack(api_workers=2, worker_concurrency=2, customers=2,
                   env={"WORKER_METRICS_BIND": "127.0.0.1:0"}) as s, QueueDepth(s.queue, every=0.1) as depth:
            result = {"scenario": scenario, **asyncio.run(_load(s.base, s.keys, scenario, args.seconds))}
        samples = sorted(depth.samples)
        result["queue_p50_p90_max"] = [samples[len(samples) // 2], samples[int(len(samples) * 0.9)], samples[-1]]
        results.append(result)
        print(json.dumps(result), flush=True)
    out = Path(__file__).resolve().parent / "results" / f"async-flood-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"seconds": args.seconds, "results": results}, indent=1))
    print(out)


if __name__ == "__main__":
    main()
