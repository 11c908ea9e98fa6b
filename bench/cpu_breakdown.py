"""Where the service's CPU goes per request: the API processes by thread (the request threads inside
the Django application, by the view's stages, and outside it, i.e. gunicorn's request handling; the
reply thread that takes completion notices; gunicorn's main loop; the background threads), and the
Celery worker's main process (consumer and pool) against its pool children (the jobs).

    .venv/bin/python bench/cpu_breakdown.py                     # 256x256 from photo-256k-*, 8 clients, 15 s
    .venv/bin/python bench/cpu_breakdown.py --size 800 --images 900k --concurrency 4

Starts the stack as bench_peers.py does, with gunicorn loading bench/threadcpu.py's wrapper of the
API (API_WSGI_APP), which writes each process's per-thread CPU (/proc, 10 ms ticks) every second.
Prints milliseconds of CPU per answered request for one closed-loop step (psutil for the worker's processes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench import loadgen  # noqa: E402
from bench.bench_peers import CORES, SETS, scrape_metrics, service_requests, stage_summary  # noqa: E402
from bench.stack import stack  # noqa: E402


def snapshot(directory: Path) -> dict[str, dict]:
    out = {}
    for path in directory.glob("cpu-*.json"):
        out[path.name] = json.loads(path.read_text())
    return out


def breakdown(before: dict[str, dict], after: dict[str, dict], answered: int) -> list[tuple[str, float]]:
    """(what, ms of CPU per answered request), over the processes seen in both snapshots."""
    totals: dict[str, float] = {}

    def add(name: str, seconds: float) -> None:
        totals[name] = totals.get(name, 0.0) + seconds

    for name in set(before) & set(after):
        a, b = before[name], after[name]
        add("the API processes, all threads", b["process"] - a["process"])
        for thread, cpu in b["threads"].items():
            add(thread, cpu - a["threads"].get(thread, 0.0))
        add("  of which inside the Django application",
            b["inside_django"]["seconds"] - a["inside_django"]["seconds"])
    if "request threads" in totals:
        totals["  of which gunicorn (outside the application)"] = (
            totals["request threads"] - totals.get("  of which inside the Django application", 0.0))
    order = ["the API processes, all threads", "request threads", "  of which inside the Django application",
             "  of which gunicorn (outside the application)"]
    rows = [(name, totals.pop(name) * 1000 / answered) for name in order if name in totals]
    rows += sorted(((name, seconds * 1000 / answered) for name, seconds in totals.items()), key=lambda r: -r[1])
    return rows


def worker_cpu(main: psutil.Process) -> dict[str, float]:
    """CPU seconds of the worker's main process and of its pool children (replaced children's
    CPU is lost: keep WORKER_MAX_MEMORY_KIB high enough that none is replaced during a step)."""
    def cpu(p: psutil.Process) -> float:
        t = p.cpu_times()
        return t.user + t.system

    children = {p.pid: cpu(p) for p in main.children(recursive=True)}
    return {"main": cpu(main), "children": sum(children.values()), "pids": sorted(children)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", choices=list(SETS), default="256k")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="threadcpu-"))
    env = {"API_WSGI_APP": "bench.threadcpu:application", "THREADCPU_DIR": str(directory)}
    with stack(api_workers=CORES, worker_concurrency=CORES, customers=8, env=env) as running:
        requests = service_requests(running.base, running.keys, args.size, args.images)
        pick = lambda i: requests[i % len(requests)]  # noqa: E731
        asyncio.run(loadgen.closed_loop(pick, concurrency=args.concurrency, seconds=3))  # warm-up
        time.sleep(1.5)  # a fresh report from every process
        worker = psutil.Process(running.worker_pid)
        before, metrics_before = snapshot(directory), scrape_metrics(f"{running.base}/metrics")
        worker_before = worker_cpu(worker)
        # No warm-up inside the measured run (the one above warmed up): the snapshots around it count
        # every answer of the run, the drain after the window included, and so must the division.
        result = asyncio.run(loadgen.closed_loop(pick, concurrency=args.concurrency, seconds=args.seconds,
                                                 warmup=0))
        time.sleep(1.5)
        after, metrics_after = snapshot(directory), scrape_metrics(f"{running.base}/metrics")
        worker_after = worker_cpu(worker)
    answered = sum(result.total.values())
    print(f"{args.size}x{args.size} from {args.images}, {args.concurrency} clients: {result.throughput:.1f}/s, "
          f"statuses {dict(result.statuses)}\n")
    stages = stage_summary(metrics_before, metrics_after)
    rows = breakdown(before, after, answered)
    inside = dict(rows).get("  of which inside the Django application")
    timed = sum(v for k, v in stages.items() if k.endswith("_cpu_ms"))
    print("| API CPU | ms per request |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")
        if inside is not None and name == "  of which inside the Django application":
            for stage in ("auth", "line", "upload", "admission", "staging", "enqueue", "respond"):
                print(f"|     the view's stage {stage} | {stages.get(f'{stage}_cpu_ms', 0.0):.2f} |")
            print(f"|     Django, DRF and middleware (the rest) | {inside - timed:.2f} |")
    print("\n| worker CPU | ms per request |\n|---|---|")
    if worker_before["pids"] != worker_after["pids"]:
        print("| (a pool child was replaced during the step: no numbers) | |")
    else:
        for part, label in (("main", "main process (consumer, pool)"), ("children", "pool children (the jobs)")):
            print(f"| {label} | {(worker_after[part] - worker_before[part]) * 1000 / answered:.2f} |")


if __name__ == "__main__":
    main()
