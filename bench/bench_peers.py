"""This service against the ceiling and against thumbor, on the same machine, images and outputs, in one run.

    .venv/bin/python bench/bench_peers.py            # `make bench`; ~17 minutes
    .venv/bin/python bench/bench_peers.py --quick    # a smoke run of the harness, ~2 minutes
    .venv/bin/python bench/bench_peers.py --only service --sizes 800 --env NAME=VALUE   # A/B of a setting

1. The ceiling: the engine in this process, conversions per CPU-second (one core), times the cores.
2. thumbor 7.8.0 (bench/thumbor-requirements.txt, installed into bench/.thumbor-venv on first use),
   one single-process server per core, loading the files from the corpus directory (its cheapest loader; no
   storage, no result storage: every request is a real conversion).
3. This service end to end: authenticated POST /v1/resize with the image as the body, through
   gunicorn, staging, the quorum queue (publisher confirms), the Celery worker, the completion
   notice, the result read, and the usage record (spool fsync + shipping to Postgres).

Both are driven by bench/loadgen.py in closed loop at increasing concurrency (clients that honor
Retry-After and ask again for the same image: its latency runs from its first attempt to its 200),
then this service with the largest number of clients ignoring Retry-After (a retry storm), and in
open loop at 80% of its peak. The two targets take turns, one output size and input set at a time,
in alternating order, each stopped while the other is measured. Outputs: fit inside 800x800 and 256x256, JPEG q85, from
photo-256k-*.jpg (4 files, ~256 KB, 1280x960) and photo-900k.jpg (~1 MB, 2560x1920). CPU per request
is read from /proc (psutil) for each component's processes around each step and divided by every
answer in that time (any status). Note: thumbor always Huffman-optimizes its JPEGs (engines/pil.py
sets optimize=True, with no setting to turn it off); the engine does not (docs/IMAGING.md): that
share of thumbor's encode is in its numbers. Results go to
bench/results/peers-<time>.json and .png (the latency-versus-load plot), and a Markdown report on
stdout; `bench/report.py <json> --plot docs/bench/latency-vs-load.png` re-renders a run for the docs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

from bench import loadgen  # noqa: E402
from bench.stack import ROOT, stack  # noqa: E402
from scripts.topology import free_port, http_ok, wait_until  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"
SETS = {"256k": [f"photo-256k-{i}.jpg" for i in range(4)], "900k": ["photo-900k.jpg"]}
SIZES = (800, 256)
QUALITY = 85
CORES = psutil.cpu_count()
THUMBOR_VENV = ROOT / "bench" / ".thumbor-venv"
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "bench" / "latency-vs-load.png"
BROKER = {"beam.smp", "erl_child_setup", "epmd", "inet_gethost"}


# --- CPU by component ---------------------------------------------------------------------------
def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def named(names: set[str]) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if p.info["name"] in names]


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class CpuMeter:
    """CPU seconds spent by each component's processes between start() and stop(), and the
    machine's busy seconds (all processes), so `other` is what nobody listed spent."""

    def __init__(self, components: dict[str, Callable[[], list[psutil.Process]]]):
        self.components = components

    def start(self) -> None:
        self.procs = {name: find() for name, find in self.components.items()}
        self.before = {name: cpu_seconds(procs) for name, procs in self.procs.items()}
        self.machine_before = self._machine()

    def stop(self) -> dict[str, float]:
        spent = {name: cpu_seconds(procs) - self.before[name] for name, procs in self.procs.items()}
        spent["machine"] = self._machine() - self.machine_before
        spent["other"] = spent["machine"] - sum(v for k, v in spent.items() if k != "machine")
        return spent

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


# --- the targets --------------------------------------------------------------------------------
@dataclass
class Step:
    target: str
    size: int
    images: str
    load: str  # "c8" (closed loop, 8 clients honoring Retry-After), "s64" (64 that don't), "r120" (open loop, 120/s)
    offered: float  # clients, or requests per second
    seconds: float
    ok: int
    throughput: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    statuses: dict[str, int]
    cpu_ms_per_request: dict[str, float]
    machine_busy: float  # share of all cores busy
    p99_ms_by_input: dict[str, float] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)
    n: int = 0  # the 200s the percentiles are taken over (p99.9 of fewer than 1,000 is their maximum)
    n_by_input: dict[str, int] = field(default_factory=dict)


def run_step(target: str, size: int, images: str, load: str, offered: float, seconds: float,
             next_request: Callable[[int], loadgen.Request], meter: CpuMeter,
             scrape: Callable[[], dict] | None = None) -> Step:
    before = scrape() if scrape else None
    meter.start()
    if load in ("closed", "storm"):
        result = asyncio.run(loadgen.closed_loop(next_request, concurrency=int(offered), seconds=seconds,
                                                 honor_retry_after=load == "closed"))
        name = f"{load[0]}{int(offered)}"
    else:
        result = asyncio.run(loadgen.open_loop(next_request, rate=offered, seconds=seconds))
        name = f"r{offered:.0f}"
    spent = meter.stop()
    # The meter ran from before the warm-up to after the last answer of the drain: its CPU is divided
    # by every answer in that time (any status), and the machine's busy share by that time.
    answered = max(1, sum(result.total.values()))
    wall = result.elapsed
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    step = Step(
        target=target, size=size, images=images, load=name, offered=offered, seconds=seconds, ok=result.ok,
        throughput=round(result.throughput, 1),
        p50_ms=ms(loadgen.percentile(result.latencies, 50)), p99_ms=ms(loadgen.percentile(result.latencies, 99)),
        p999_ms=ms(loadgen.percentile(result.latencies, 99.9)), max_ms=ms(max(result.latencies, default=0)),
        statuses={str(k): v for k, v in result.statuses.items()},
        cpu_ms_per_request={k: round(v * 1000 / answered, 2) for k, v in spent.items() if k != "machine"},
        machine_busy=round(spent["machine"] / (wall * CORES), 3),
        p99_ms_by_input={label: ms(loadgen.percentile(v, 99)) for label, v in sorted(result.by_label.items())},
        n=len(result.latencies),
        n_by_input={label: len(v) for label, v in sorted(result.by_label.items())},
    )
    if scrape:
        step.stages = stage_summary(before, scrape())
    print(f"  {target:8} {size:4} {images:5} {name:6} ok={step.ok:5} {step.throughput:7.1f}/s p50={step.p50_ms:7.1f} "
          f"p99={step.p99_ms:7.1f} p99.9={step.p999_ms:7.1f} busy={step.machine_busy:.2f} "
          f"statuses={step.statuses} cpu/req={step.cpu_ms_per_request}", flush=True)
    return step


def thumbor_url(base: str, size: int, name: str) -> str:
    return f"{base}/unsafe/fit-in/{size}x{size}/filters:quality({QUALITY})/{name}"


THUMBOR_CONF = """
LOADER = 'thumbor.loaders.file_loader'
FILE_LOADER_ROOT_PATH = {root!r}
STORAGE = 'thumbor.storages.no_storage'
RESULT_STORAGE = None
QUALITY = {quality}
PROGRESSIVE_JPEG = False
RESPECT_ORIENTATION = True
ALLOW_UNSAFE_URL = True
"""


def thumbor_venv() -> Path:
    python = THUMBOR_VENV / "bin" / "python"
    if not python.exists():
        print("installing thumbor into bench/.thumbor-venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(THUMBOR_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(ROOT / "bench" / "thumbor-requirements.txt")],
                       check=True)
    return THUMBOR_VENV / "bin" / "thumbor"


@contextmanager
def thumbor(instances: int) -> Iterator[tuple[list[str], list[int]]]:
    """`instances` single-process thumbor servers on their own loopback ports, as thumbor's docs
    deploy it (one per core behind a balancer; here the load generator alternates between them, so
    no balancer's CPU is charged to it). `thumbor --processes N` shares one listening socket, and
    with keep-alive clients one process took nearly every connection (one core busy of two).
    Yields (base URLs, pids)."""
    scratch = Path(tempfile.mkdtemp(prefix="bench-thumbor-"))
    conf = scratch / "thumbor.conf"
    conf.write_text(THUMBOR_CONF.format(root=str(CORPUS), quality=QUALITY))
    log = open(scratch / "thumbor.log", "wb")
    procs, bases = [], []
    try:
        for _ in range(instances):
            port = free_port()
            procs.append(subprocess.Popen([str(thumbor_venv()), "-i", "127.0.0.1", "-p", str(port), "-c", str(conf),
                                           "-l", "error"], stdout=log, stderr=subprocess.STDOUT))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            wait_until("thumbor", lambda base=base: http_ok(f"{base}/healthcheck"), 60, procs)
        yield bases, [p.pid for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(20)


# --- this service's requests ----------------------------------------------------------------------
def service_requests(base: str, keys: list[str], size: int, images: str) -> list[loadgen.Request]:
    """POST /v1/resize of every input of the set from every customer: request i carries input
    i mod n from customer (i div n) mod len(keys). Pick them round-robin."""
    query = f"width={size}&height={size}&fit=inside&format=jpeg&quality={QUALITY}"
    return [loadgen.Request("POST", f"{base}/v1/resize?{query}", name, (CORPUS / name).read_bytes(),
                            {"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"})
            for key in keys for name in SETS[images]]


# --- the API's own stage timings (its /metrics) -----------------------------------------------------
def scrape_metrics(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def stage_summary(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per stage over the step, the request thread's CPU ms per request by stage, and the
    share of enqueues (publish + confirm) under 10 ms."""
    def grew(name: str, **labels: str) -> float:
        pick = lambda d: sum(v for (n, ls), v in d.items() if n == name and set(labels.items()) <= set(ls))  # noqa: E731
        return pick(after) - pick(before)

    out: dict[str, float] = {}
    for stage in ("auth", "line", "upload", "admission", "staging", "enqueue", "queue_wait", "processing", "result_return"):
        count = grew("resizer_resize_stage_duration_seconds_count", stage=stage)
        if count:
            out[f"{stage}_mean_ms"] = round(grew("resizer_resize_stage_duration_seconds_sum", stage=stage) / count * 1000, 2)
    # The request thread's CPU per request, by stage (the rest of the API's CPU is gunicorn's and Django's).
    served = grew("resizer_resize_requests_total", outcome="served")
    if served:
        for stage in ("auth", "line", "upload", "admission", "staging", "enqueue", "respond"):
            out[f"{stage}_cpu_ms"] = round(grew("resizer_resize_stage_cpu_seconds_total", stage=stage) / served * 1000, 3)
    count = grew("resizer_resize_stage_duration_seconds_count", stage="enqueue")
    if count:
        out["enqueue_share_le_10ms"] = round(grew("resizer_resize_stage_duration_seconds_bucket", stage="enqueue",
                                                  le="0.01") / count, 4)
    return out


# --- 1. the ceiling -----------------------------------------------------------------------------
def ceiling(seconds: float) -> dict[str, float]:
    """Engine conversions per CPU-second, in this process, one core."""
    import django

    django.setup()
    from resizer import imaging

    out = {}
    for size in SIZES:
        params = imaging.Params(width=size, height=size, fit="inside", format="jpeg", quality=QUALITY)
        for images, names in SETS.items():
            datas = [(CORPUS / n).read_bytes() for n in names]
            imaging.resize(datas[0], params)
            n, started = 0, time.process_time()
            while time.process_time() - started < seconds:
                imaging.resize(datas[n % len(datas)], params)
                n += 1
            rate = n / (time.process_time() - started)
            out[f"{size}/{images}"] = round(rate, 1)
            print(f"  ceiling  {size:4} {images:5} {rate:7.1f} conversions per CPU-second", flush=True)
    return out


# --- what each target's output looks like -------------------------------------------------------
def fetch_outputs(get: Callable[[str, int], bytes], sizes: list[int]) -> dict[str, bytes]:
    """One output per (size, input file), keyed "size/name"."""
    return {f"{size}/{name}": get(name, size) for size in sizes for names in SETS.values() for name in names}


def output_quality(outputs: dict[str, dict[str, bytes]]) -> list[dict]:
    """PSNR and SSIM of each target's outputs against a Lanczos resize of the full decode (as
    bench_imaging.py measures the engine), and their size in bytes."""
    import io

    from PIL import Image

    from bench.bench_imaging import psnr, reference, ssim

    rows = []
    for target, by_key in outputs.items():
        for key, data in sorted(by_key.items()):
            size, name = key.split("/")
            out = Image.open(io.BytesIO(data))
            out.load()
            ref = reference((CORPUS / name).read_bytes(), out.size)
            rows.append({"target": target, "size": int(size), "input": name, "width": out.width, "height": out.height,
                         "bytes": len(data), "psnr": round(psnr(out, ref), 2), "ssim": round(ssim(out, ref) or 0, 4)})
    return rows


# --- the run ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: two load levels, short steps")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per step")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64,128", help="closed-loop concurrencies")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--only", choices=["thumbor", "service"], help="run one target (and the ceiling)")
    parser.add_argument("--worker-nice", type=int, default=0, help="run the worker at this nice level")
    parser.add_argument("--worker-pool", choices=["prefork", "solo"], default="prefork",
                        help="solo: as many single-process workers as cores (an experiment: no time limits)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the service's processes (repeatable), "
                             "e.g. ADMISSION_TARGET_QUEUE_WAIT_SECONDS=0")
    args = parser.parse_args()
    levels = [1, 8] if args.quick else [int(x) for x in args.levels.split(",")]
    seconds = 3.0 if args.quick else args.seconds
    sizes = [int(x) for x in args.sizes.split(",")]
    loadgen_proc = lambda: [psutil.Process()]  # noqa: E731
    steps: list[Step] = []
    outputs: dict[str, dict[str, bytes]] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    print("1. the ceiling (engine in-process, one core)", flush=True)
    ceilings = ceiling(1.0 if args.quick else 3.0)

    @contextmanager
    def thumbor_running() -> Iterator[Callable[[int, str], None]]:
        with thumbor(CORES) as (bases, pids):
            if "thumbor" not in outputs:
                outputs["thumbor"] = fetch_outputs(lambda name, size: httpx.get(
                    thumbor_url(bases[0], size, name), timeout=30).raise_for_status().content, sizes)
            meter = CpuMeter({"thumbor": lambda: [p for pid in pids for p in tree(pid)], "loadgen": loadgen_proc})

            def measure(size: int, images: str) -> None:
                names = SETS[images]
                # Request i goes to server i mod n: each server gets an equal share of every client.
                get = lambda i: loadgen.Request(  # noqa: E731
                    "GET", thumbor_url(bases[i % len(bases)], size, names[(i // len(bases)) % len(names)]),
                    names[(i // len(bases)) % len(names)])
                for c in levels:
                    steps.append(run_step("thumbor", size, images, "closed", c, seconds, get, meter))

            yield measure

    @contextmanager
    def service_running() -> Iterator[Callable[[int, str], None]]:
        with stack(api_workers=CORES, worker_concurrency=CORES, customers=8,
                   env=dict(item.split("=", 1) for item in args.env), worker_nice=args.worker_nice,
                   worker_pool=args.worker_pool) as running:
            if "service" not in outputs:
                outputs["service"] = fetch_outputs(lambda name, size: httpx.post(
                    f"{running.base}/v1/resize?width={size}&height={size}&fit=inside&format=jpeg&quality={QUALITY}",
                    content=(CORPUS / name).read_bytes(), headers={"Authorization": f"Bearer {running.keys[0]}"},
                    timeout=30).raise_for_status().content, sizes)
            meter = CpuMeter({
                "api": lambda: tree(running.api_pid), "worker": lambda: tree(running.worker_pid),
                "broker": lambda: named(BROKER), "postgres": lambda: named({"postgres"}), "loadgen": loadgen_proc,
            })
            scrape = lambda: scrape_metrics(f"{running.base}/metrics")  # noqa: E731

            def measure(size: int, images: str) -> None:
                prepared = service_requests(running.base, running.keys, size, images)
                rotate = lambda i: prepared[i % len(prepared)]  # noqa: E731
                own: list[Step] = []
                for c in levels:
                    step = run_step("service", size, images, "closed", c, seconds, rotate, meter, scrape)
                    steps.append(step)
                    own.append(step)
                peak = max(step.throughput for step in own)
                steps.append(run_step("service", size, images, "storm", max(levels), seconds, rotate, meter, scrape))
                # Four times a closed step's length: a few hundred answers per input for its p99.
                steps.append(run_step("service", size, images, "open", round(0.8 * peak), seconds * 4, rotate,
                                      meter, scrape))

            yield measure

    # The targets take turns, output size and input set at a time, in alternating order (thumbor
    # first, then the service first, ...): the machine's speed drifts by tens of percent over minutes,
    # and all of one target before all of the other put the drift into the ratio. Only one runs at a
    # time: the other is stopped, so its idle processes cost the measured one nothing.
    running_targets = {"thumbor": thumbor_running, "service": service_running}
    wanted = [t for t in ("thumbor", "service") if args.only in (None, t)]
    groups = [(size, images) for size in sizes for images in SETS]
    for index, (size, images) in enumerate(groups):
        for target in (wanted if index % 2 == 0 else wanted[::-1]):
            print(f"{index + 2}. {target}: fit {size}x{size} from {images} "
                  f"({'thumbor: ' + str(CORES) + ' single-process servers, file loader' if target == 'thumbor' else str(CORES) + ' API processes, ' + str(CORES) + ' worker processes, RabbitMQ, PostgreSQL'})",
                  flush=True)
            with running_targets[target]() as measure:
                measure(size, images)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"peers-{started.replace(':', '')}.json"
    quality = output_quality(outputs)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out.write_text(json.dumps({"started": started, "commit": commit, "cores": CORES, "env": args.env,
                               "ceiling": ceilings, "quality": quality, "steps": [asdict(s) for s in steps]}, indent=1))
    print(f"\nresults: {out}")
    from bench.report import plot, report

    rows = [asdict(s) for s in steps]
    plot(rows, out.with_suffix(".png"))
    print(f"plot: {out.with_suffix('.png')}  (docs/BENCHMARKS.md shows {PLOT.relative_to(ROOT)}: "
          f"bench/report.py {out.relative_to(ROOT)} --plot {PLOT.relative_to(ROOT)})")
    print(report(ceilings, rows, CORES, quality))


if __name__ == "__main__":
    # A TERM (or Ctrl-C) unwinds the context managers, so the servers this started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
