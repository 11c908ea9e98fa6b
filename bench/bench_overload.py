"""Admission control under overload: the latencies it buys, measured (tests assert only what it does to
the queue; tests/reliability/test_overload.py).

4 customers × 4 clients send SLO-class images (photo-900k.jpg to 1280 px, ~70 ms of a worker's CPU) to
one API process in front of one worker process, more than it drains; a refused client waits its second
(Retry-After) and sends again. The same load without admission control (every request admitted: it
waits in the queue) and with it (in flight 4, queue depth 3, as ADR 0006 sizes it), taking turns,
`--runs` times each. Reported per run: images served a second, the admitted answers' p50/p99, the
refusals' p99 and codes, and the jobs waiting in the queue (RabbitMQ's ready count every 50 ms).

    .venv/bin/python bench/bench_overload.py [--runs 3] [--seconds 15]

Uses the running PostgreSQL and RabbitMQ (private queue, staging and spool; bench customers in the
database of DATABASE_URL, as bench_peers.py). Needs a quiet machine: everything shares its cores.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench.stack import stack  # noqa: E402
from tests.reliability.load import OVERLOAD_BOUNDS, Load, QueueDepth, percentile  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
CONFIGS = {"without": OVERLOAD_BOUNDS["without admission control"], "with": OVERLOAD_BOUNDS["with admission control"]}
WARM_UP = 2.0  # seconds; each process's first requests also connect to the broker


def one_run(config: str, seconds: float, image: bytes) -> dict:
    with stack(api_workers=1, worker_concurrency=1, customers=4, env=CONFIGS[config]) as s:
        with QueueDepth(s.queue) as depth:
            loads = [Load(s.base, key, image, threads=4, duration=seconds, query="width=1280", refusal_pause=1.0,
                          timeout=60).start() for key in s.keys]
            answers = [a for load in loads for a in load.join()]
    warm = min(a.started for a in answers) + WARM_UP
    answers = [a for a in answers if a.started >= warm]
    served = [a.seconds for a in answers if a.status == 200]
    refused = [a for a in answers if a.status in (429, 503)]
    codes: dict[str, int] = {}
    for a in answers:
        if a.status != 200:
            codes[f"{a.status} {a.code}"] = codes.get(f"{a.status} {a.code}", 0) + 1
    return {
        "config": config, "served_per_s": round(len(served) / (seconds - WARM_UP), 2), "served": len(served),
        "accepted_p50_ms": round(percentile(served, 0.5) * 1000), "accepted_p99_ms": round(percentile(served, 0.99) * 1000),
        "refused_p99_ms": round(percentile([a.seconds for a in refused], 0.99) * 1000) if refused else None,
        "not_200": codes, "queue_ready_max": max(depth.samples), "queue_ready_mean": round(statistics.mean(depth.samples), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    image = (CORPUS / "photo-900k.jpg").read_bytes()
    results = []
    for i in range(args.runs):
        for config in (("without", "with") if i % 2 == 0 else ("with", "without")):
            result = one_run(config, args.seconds, image)
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| admission control | served /s | accepted p50 ms | accepted p99 ms | refused p99 ms | not 200 | jobs in queue: max / mean |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["config"], reverse=True):
        print(f"| {r['config']} | {r['served_per_s']} | {r['accepted_p50_ms']} | {r['accepted_p99_ms']} | "
              f"{r['refused_p99_ms'] if r['refused_p99_ms'] is not None else '—'} | "
              f"{', '.join(f'{k}: {v}' for k, v in sorted(r['not_200'].items())) or '0'} | "
              f"{r['queue_ready_max']} / {r['queue_ready_mean']} |")
    out = Path(__file__).resolve().parent / "results" / f"overload-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"runs": args.runs, "seconds": args.seconds, "results": results}, indent=1))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
