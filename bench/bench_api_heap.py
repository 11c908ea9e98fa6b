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
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_soak import CORPUS, request  # noqa: E402


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix="api-heap-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    os.environ.update({
        "RESIZE_QUEUE": f"bench.api-heap.{run}", "STAGING_URL": f"file://{scratch / 'staging'}",
        "METERING_SPOOL_DIR": str(scratch / "spool"), "AUTH_SNAPSHOT_PATH": str(scratch / "snapshot.json"),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings", "WORKER_METRICS_BIND": "",
    })
    worker = subprocess.Popen([str(Path(sys.executable).parent / "celery"), "-A", "controlplane", "worker",
                               "--loglevel", "WARNING", "--concurrency", "2", "--hostname", f"api-heap-{run}@%h"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import django

    django.setup()
    from controlplane.celery import app
    from controlplane.wsgi import application
    from identity.models import Plan
    from identity.services import api_key_create, customer_create

    devnull = open(os.devnull, "w")  # after the WSGI import: it configures logging again
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(devnull)
    plan = Plan.objects.create(name=f"api-heap-{run}", rate_per_second=1e6, burst=1_000_000)
    key = api_key_create(customer=customer_create(name=f"api-heap-{run}", plan=plan))[1]
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

    try:
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
    finally:
        worker.terminate()
        worker.wait(30)
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(os.environ["RESIZE_QUEUE"])
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
