"""Where the service's CPU goes under load: py-spy on every API and worker process, on-CPU samples only.

    .venv/bin/python bench/profile_service.py [--size 256] [--images 256k] [--concurrency 8] [--seconds 15]

Starts the stack as bench_peers.py does, holds a closed-loop load, records each process with
`py-spy record --format raw` (collapsed stacks; needs ptrace, i.e. root or CAP_SYS_PTRACE), and
prints, for the API (samples holding the GIL: its threads mostly wait), for the worker's pool
processes and for its main process (Celery's consumer and prefork pool; py-spy counted its epoll
waits as on-CPU: two thirds of its samples, more than its /proc CPU time allows), the share of
samples spent inside each function (inclusive) and at the top of the stack (self). The raw files
stay in bench/results/ for flame graphs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench import loadgen  # noqa: E402
from bench.bench_peers import CORES, RESULTS, SETS, service_requests, tree  # noqa: E402
from bench.stack import VENV_BIN, stack  # noqa: E402


def summarize(raw_files: list[Path], top: int) -> str:
    inclusive: Counter = Counter()
    own: Counter = Counter()
    total = 0
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack_text, _, count_text = line.rpartition(" ")
            if not stack_text:
                continue
            count = int(count_text)
            frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                      if " (" in f else f for f in stack_text.split(";")]
            total += count
            own[frames[-1]] += count
            for frame in set(frames):
                inclusive[frame] += count
    lines = [f"{total} samples", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]
    lines += ["self:"]
    lines += [f"  {n / total:6.1%}  {frame}" for frame, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", choices=list(SETS), default="256k")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    with stack(api_workers=CORES, worker_concurrency=CORES, customers=8) as running:
        requests = service_requests(running.base, running.keys, args.size, args.images)
        result: list[loadgen.Result] = []
        load = threading.Thread(target=lambda: result.append(asyncio.run(loadgen.closed_loop(
            lambda i: requests[i % len(requests)], concurrency=args.concurrency, seconds=args.seconds + 4))))
        load.start()
        time.sleep(2)
        api = tree(running.api_pid)[1:]  # gunicorn's workers, not its master
        worker_main, *worker = tree(running.worker_pid)  # Celery's consumer and prefork pool; the pool processes
        files: dict[str, list[Path]] = {"api": [], "worker": [], "worker-main": []}
        spies = []
        for role, procs in (("api", api), ("worker", worker), ("worker-main", [worker_main])):
            for p in procs:
                out = RESULTS / f"profile-{stamp}-{role}-{p.pid}.txt"
                files[role].append(out)
                spies.append(subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(p.pid), "--format", "raw",
                                               "--duration", str(args.seconds), "--rate", "200", "--nonblocking",
                                               # The API's threads mostly wait (GIL released): only count
                                               # samples holding the GIL, i.e. Python at work.
                                               *(["--gil"] if role == "api" else []),
                                               "--output", str(out)], stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
        for spy in spies:
            spy.wait()
        load.join()
    r = result[0]
    print(f"load: c{args.concurrency}, {r.throughput:.1f}/s, p50 {loadgen.percentile(r.latencies, 50) * 1000:.1f} ms, "
          f"statuses {dict(r.statuses)}")
    for role, paths in files.items():
        print(f"\n== {role} ({len(paths)} processes) ==")
        print(summarize([p for p in paths if p.exists()], args.top))


if __name__ == "__main__":
    # A TERM (or Ctrl-C) unwinds the context managers, so the servers this started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
