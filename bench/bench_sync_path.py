"""The synchronous resize path, end to end over real HTTP, against the engine alone.

For a ~256 KB 1280x960 JPEG resized to fit 256x256 (JPEG q85): latency percentiles of
POST /v1/resize (auth, header probe, staging, publish + quorum confirm, queue, worker, completion
notice, result read) at concurrency 1 and 4, next to the CPU time of the same conversion done
in-process by the engine, and the broker's publish+confirm latency on its own.

    .venv/bin/python bench/bench_sync_path.py [--requests 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import percentile  # noqa: E402
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench.stack import ROOT, stack  # noqa: E402

IMAGES = sorted((ROOT.parent / "shared" / "corpus").glob("photo-256k-*.jpg"))


def engine_ms(datas: list[bytes], n: int) -> list[float]:
    from resizer import imaging

    params = imaging.Params(width=256, height=256, format="jpeg", quality=85)
    out = []
    for i in range(n):
        t = time.perf_counter()
        imaging.resize(datas[i % len(datas)], params)
        out.append((time.perf_counter() - t) * 1000)
    return out


def publish_confirm_ms(n: int) -> list[float]:
    """Publish + confirm of a job-sized message to a quorum queue like ours (no consumer)."""
    from kombu import Producer, Queue

    import celeryconfig
    from controlplane.celery import app

    name = f"bench.confirm.{uuid.uuid4().hex[:8]}"
    queue = Queue(name, celeryconfig.resize_exchange, routing_key=f"{name}.#",
                  queue_arguments=celeryconfig.resize_queue.queue_arguments)
    out = []
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue.bind(channel).declare()
        producer = Producer(channel)
        try:
            for _ in range(n):
                t = time.perf_counter()
                producer.publish({"job": uuid.uuid4().hex}, exchange=queue.exchange, routing_key=f"{name}.x")
                out.append((time.perf_counter() - t) * 1000)
        finally:
            queue.bind(channel).delete()
    return out


def run_http(base: str, key: str, datas: list[bytes], n: int, concurrency: int) -> tuple[list[float], int]:
    errors = 0
    latencies: list[float] = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                      limits=httpx.Limits(max_connections=concurrency)) as http:
        def one(i: int) -> None:
            nonlocal errors
            t = time.perf_counter()
            r = http.post("/v1/resize?width=256&height=256&format=jpeg&quality=85", content=datas[i % len(datas)])
            latencies.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                errors += 1

        for i in range(20):  # warm up: connections, worker children, reply queues
            one(i)
        latencies.clear()
        errors = 0
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    import logging

    import django

    logging.getLogger("httpx").setLevel(logging.WARNING)

    django.setup()
    datas = [p.read_bytes() for p in IMAGES]
    rows = []
    engine = engine_ms(datas, 100)
    rows.append(("engine alone, in-process (wall ms per conversion)", engine, 0))
    confirm = publish_confirm_ms(args.requests)
    rows.append(("publish + confirm to a quorum queue", confirm, 0))
    with stack() as running:
        base, key = running.base, running.keys[0]
        for concurrency in (1, 4):
            latencies, errors = run_http(base, key, datas, args.requests, concurrency)
            rows.append((f"POST /v1/resize sync, concurrency {concurrency}", latencies, errors))
    print(f"\n{len(datas)} images photo-256k-*.jpg -> fit 256x256 JPEG q85; {args.requests} requests per row\n")
    print("| what | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|")
    for name, values, errors in rows:
        print(f"| {name} | {statistics.median(values):.1f} | {percentile(values, 90):.1f} "
              f"| {percentile(values, 99):.1f} | {max(values):.1f} | {errors} |")


if __name__ == "__main__":
    main()
