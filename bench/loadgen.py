"""An async HTTP load generator (aiohttp) for the peer benchmark.

Two shapes of load:
- closed loop: `concurrency` clients, each sending its next request when the previous answer
  arrives (what a fixed pool of callers does; finds the peak throughput);
- open loop: requests arrive at `rate` per second (Poisson), whether or not earlier ones were
  answered (what the internet does; latency is measured from the planned arrival, so a lagging
  generator or a full server shows up in the numbers instead of hiding them).

Every answer is counted by status; only 200s go into the latency percentiles. In the closed loop a
client told to come back later (429/503) asks again for the same image, and that image's latency
runs from its first attempt to its 200, the waits included: what its caller waited (a refusal is not
a fast answer). A warm-up before the measured window is sent and thrown away from the percentiles;
every answer (warm-up and the drain after the window included) is counted in `total` over `elapsed`
seconds, for CPU per answer.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    label: str  # the input it carries (a file name): percentiles are also kept per label
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)  # HTTP status, or the exception's class name
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only
    by_label: dict[str, list[float]] = field(default_factory=dict)
    total: Counter = field(default_factory=Counter)  # every answer, warm-up and drain included
    elapsed: float = 0.0  # seconds from the first request sent to the last answer

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def throughput(self) -> float:
        """200s per second of the measured window."""
        return self.ok / self.seconds if self.seconds else 0.0

    def record(self, request: Request, status: int | str, latency: float) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies.append(latency)
            self.by_label.setdefault(request.label, []).append(latency)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100)
    return ordered[int(min(rank, len(ordered))) - 1]


async def _send(session: aiohttp.ClientSession, request: Request) -> tuple[int | str, float]:
    """(the status or the exception's name, the answer's Retry-After in seconds or 0)."""
    try:
        async with session.request(request.method, request.url, data=request.body, headers=request.headers) as r:
            await r.read()
            retry_after = r.headers.get("Retry-After", "")
            return r.status, float(retry_after) if retry_after.isdigit() else 0.0
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        return type(e).__name__, 0.0


def _session(limit: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False),
                                 timeout=aiohttp.ClientTimeout(total=timeout), auto_decompress=False)


async def closed_loop(next_request: Callable[[int], Request], *, concurrency: int, seconds: float,
                      warmup: float = 1.0, timeout: float = 30.0, honor_retry_after: bool = True) -> Result:
    """`concurrency` clients on their own keep-alive connections for warmup + seconds. A client told
    to come back later (429/503 with Retry-After) waits that long first, as a well-behaved client
    does; with honor_retry_after=False it asks again at once (a retry storm)."""
    result = Result()
    counter = iter(range(1 << 62))
    async with _session(concurrency, timeout) as session:
        start = time.perf_counter()
        window_start, window_end = start + warmup, start + warmup + seconds

        async def client() -> None:
            request, first = None, 0.0
            while (sent := time.perf_counter()) < window_end:
                if request is None:  # a new image; a refused one is asked for again
                    request, first = next_request(next(counter)), sent
                status, retry_after = await _send(session, request)
                done = time.perf_counter()
                result.total[status] += 1
                if window_start <= done <= window_end:  # answered inside the window
                    result.record(request, status, done - first)
                if status in (429, 503):
                    if honor_retry_after and retry_after:
                        await asyncio.sleep(min(retry_after, max(0.0, window_end - done)))
                else:
                    request = None

        await asyncio.gather(*(client() for _ in range(concurrency)))
        result.elapsed = time.perf_counter() - start
    result.seconds = seconds
    return result


async def open_loop(next_request: Callable[[int], Request], *, rate: float, seconds: float,
                    warmup: float = 1.0, timeout: float = 30.0, seed: int = 1) -> Result:
    """Poisson arrivals at `rate`/s for warmup + seconds; every request answered (or timed out) is
    counted if it was planned inside the measured window."""
    result = Result()
    rng = random.Random(seed)
    tasks: list[asyncio.Task] = []
    async with _session(0, timeout) as session:
        start = time.perf_counter()
        window_start, end = start + warmup, start + warmup + seconds

        async def one(i: int, planned: float) -> None:
            request = next_request(i)
            status, _ = await _send(session, request)
            result.total[status] += 1
            if planned >= window_start:
                result.record(request, status, time.perf_counter() - planned)

        planned, i = start, 0
        while planned < end:
            delay = planned - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, planned)))
            i += 1
            planned += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        result.elapsed = time.perf_counter() - start
    result.seconds = seconds
    return result
