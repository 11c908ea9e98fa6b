"""Whether the API's Python heap grows with requests: the WSGI application in this process (no gunicorn),
4 threads sending the mix of bench_soak.py (every corpus image in every fit mode and several formats,
some cut in half, some with a wrong key, a bad parameter or `Prefer: respond-async`), synchronous ones
answered by a real Celery worker. After each batch, tracemalloc's traced memory before and after a full
`gc.collect()` (what the batch left that only a full collection frees, and what stays), and the
process's RSS; at the end the allocation sites that grew most. A leak shows as "after gc.collect" rising
batch after batch; RSS rising while it stays flat is the allocator's (fragmentation, arenas), not ours.

    .venv/bin/python bench/bench_api_heap.py [--batches 5] [--batch 1000]

Uses the running PostgreSQL (database `resizer`, one customer named api-heap-*) and RabbitMQ (a private
queue, deleted after); stages into a directory under /dev/shm (deleted after).
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import random
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_api_path import in_process_api  # noqa: E402
from bench.bench_soak import CORPUS, request, rss_kib  # noqa: E402


def rss_mib() -> float:
    return rss_kib(os.getpid()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    with in_process_api("api-heap", {"WORKER_METRICS_BIND": ""}) as (application, key):
        worker = subprocess.Popen([str(Path(sys.executable).parent / "celery"), "-A", "controlplane", "worker",
                                   "--loglevel", "WARNING", "--concurrency", "2",
                                   "--hostname", f"{os.environ['RESIZE_QUEUE']}@%h"],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _measure(application, key, args)
        finally:
            worker.terminate()
            worker.wait(30)


def _measure(application: Any, key: str, args: argparse.Namespace) -> None:
    images = [p.read_bytes() for p in sorted(CORPUS.iterdir())
              if p.suffix in (".jpg", ".png", ".gif", ".webp") and p.stat().st_size < 2_000_000]
    answers: Counter = Counter()
    lock = threading.Lock()

    def one(rnd: random.Random) -> None:
        path, body, headers = request(rnd, images, key)
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": path.partition("?")[0], "QUERY_STRING": path.partition("?")[2],
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "127.0.0.1:8000",
            **{("CONTENT_TYPE" if name == "Content-Type" else "HTTP_" + name.upper().replace("-", "_")): value
               for name, value in headers.items()},
        }
        status: list[str] = []
        response = application(environ, lambda s, h, exc_info=None: status.append(s))
        b"".join(response)
        response.close()
        with lock:
            answers[status[0][:3]] += 1

    def batch(n: int) -> None:
        def client(seed: float) -> None:
            rnd = random.Random(seed)
            for _ in range(n // 4):
                one(rnd)
        threads = [threading.Thread(target=client, args=(random.random(),)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    time.sleep(5)  # the worker connects
    batch(args.batch)  # warm-up: connections, snapshot, caches
    tracemalloc.start(12)
    gc.collect()
    first = tracemalloc.take_snapshot()
    print(f"after the warm-up ({sum(answers.values())} requests): RSS {rss_mib():.0f} MiB", flush=True)
    for i in range(args.batches):
        batch(args.batch)
        before = tracemalloc.get_traced_memory()[0] / 1024
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] / 1024
        print(f"batch {i + 1} ({sum(answers.values())} requests): traced {before:,.0f} KiB, after gc.collect "
              f"{after:,.0f} KiB; RSS {rss_mib():.0f} MiB", flush=True)
    print("answers:", dict(sorted(answers.items())))
    for stat in tracemalloc.take_snapshot().compare_to(first, "lineno")[:5]:
        print(" ", stat)


if __name__ == "__main__":
    main()
