"""A soak of the API and the worker: many requests of every kind, and each process's memory along the way.

Clients send, over kept-alive connections, a mix of what customers send: every corpus image (JPEG, PNG,
GIF, WebP) to 64, 256 or 800 px in each fit mode and several formats, a tenth of them cut in half, and
some with a wrong key, a bad parameter or `Prefer: respond-async`. Reported: the answers by status, any
connection error, and the resident memory (RSS) of each API process and each worker child after the
warm-up, every tenth of the run and at the end, with the growth per 1,000 requests from the warm-up
and over the second half. A leak shows as growth that keeps going through the second half; caches
filling as growth that stops; allocator noise as a few MB up and down.

    .venv/bin/python bench/bench_soak.py [--requests 12000] [--clients 4]

Uses the running PostgreSQL and RabbitMQ (private queue, staging and spool, as bench_peers.py).
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench.stack import stack  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus"
WARM_UP = 0.1  # the share of the requests before the first memory reading


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def request(rnd: random.Random, images: list[bytes], key: str) -> tuple[str, bytes, dict[str, str]]:
    body = rnd.choice(images)
    query = (f"width={rnd.choice([64, 256, 800])}&fit={rnd.choice(['inside', 'cover', 'contain', 'fill', 'outside'])}"
             f"&format={rnd.choice(['auto', 'jpeg', 'webp', 'png'])}")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream",
               "Accept": "image/webp,*/*"}
    kind = rnd.random()
    if kind < 0.10:
        body = body[: len(body) // 2]
    elif kind < 0.15:
        headers["Authorization"] = f"Bearer rsz_wrong_{uuid.uuid4().hex}"
    elif kind < 0.20:
        query = "width=abc"
    elif kind < 0.25:
        headers["Prefer"] = "respond-async"
    return f"/v1/resize?{query}", body, headers


def client(base: str, key: str, images: list[bytes], count: int, seed: int, answers: Counter, lock: threading.Lock,
           done: list[int]) -> None:
    url = urlsplit(base)
    rnd = random.Random(seed)

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(url.hostname, url.port, timeout=120)

    conn = connect()
    for _ in range(count):
        path, body, headers = request(rnd, images, key)
        try:
            conn.request("POST", path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            answer: int | str = response.status
            if (response.getheader("Connection") or "").lower() == "close":
                conn.close()
                conn = connect()
        except (OSError, http.client.HTTPException) as e:
            answer = type(e).__name__
            conn.close()
            conn = connect()
        with lock:
            answers[answer] += 1
            done[0] += 1
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=12_000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    images = [p.read_bytes() for p in sorted(CORPUS.iterdir())
              if p.suffix in (".jpg", ".png", ".gif", ".webp") and p.stat().st_size < 2_000_000]
    answers: Counter = Counter()
    lock, done = threading.Lock(), [0]
    with stack(api_workers=2, worker_concurrency=2) as s:
        threads = [threading.Thread(target=client, args=(s.base, s.keys[0], images, args.requests // args.clients, i,
                                                          answers, lock, done)) for i in range(args.clients)]
        started = time.monotonic()
        for t in threads:
            t.start()
        readings: list[tuple[int, dict[str, int]]] = []
        next_reading = int(args.requests * WARM_UP)
        while any(t.is_alive() for t in threads) or not readings or readings[-1][0] < done[0]:
            if done[0] >= next_reading or not any(t.is_alive() for t in threads):
                processes = {f"api {p}": rss_kib(p) for p in children(s.api_pid)}
                processes |= {f"worker child {p}": rss_kib(p) for p in children(s.worker_pid)}
                readings.append((done[0], processes))
                print(f"{done[0]:>6} requests, {time.monotonic() - started:5.0f} s: "
                      + ", ".join(f"{name} {kib / 1024:.1f} MiB" for name, kib in processes.items()), flush=True)
                next_reading += args.requests // 10
            time.sleep(0.5)
        for t in threads:
            t.join()
    print("answers:", dict(sorted(answers.items(), key=str)))
    # Growth that stops is caches filling (threads' buffers, metric label sets); a leak keeps growing
    # through the second half as through the first.
    for label, (start_n, start), (end_n, end) in (("the warm-up to the end", readings[0], readings[-1]),
                                                  ("the middle to the end", readings[len(readings) // 2],
                                                   readings[-1])):
        print(f"from {label} ({start_n} -> {end_n} requests):")
        for name in start:
            if name in end:  # a worker child replaced in between (max memory per child) has no growth to show
                growth = (end[name] - start[name]) / 1024
                print(f"  {name}: {start[name] / 1024:.1f} -> {end[name] / 1024:.1f} MiB "
                      f"({growth * 1000 / max(end_n - start_n, 1):+.2f} MiB per 1,000 requests)")

if __name__ == "__main__":
    main()
