"""A small load generator for the reliability tests: a few threads sending resizes with httpx to one
base URL (a load balancer or an API server), bounded in count and in time, recording every answer."""
from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx


# The overload comparison's two API servers (tests/reliability/test_overload.py asserts what they do to
# the queue, bench/bench_overload.py measures their latencies): every request admitted, or admission
# control sized as ADR 0006 says for one worker process draining ~11 jobs/s (in flight 4, depth 3).
OVERLOAD_BOUNDS = {
    "without admission control": {"ADMISSION_MAX_IN_FLIGHT": "1000", "ADMISSION_MAX_QUEUE_DEPTH": "0",
                                  "ADMISSION_TARGET_QUEUE_WAIT_SECONDS": "0"},
    "with admission control": {"ADMISSION_MAX_IN_FLIGHT": "4", "ADMISSION_MAX_QUEUE_DEPTH": "3",
                               "ADMISSION_QUEUE_PROBE_SECONDS": "0.25"},
}


@dataclass
class Answer:
    started: float  # time.monotonic()
    finished: float
    status: int  # 0: no HTTP answer at all (a transport error)
    code: str  # "ok", "accepted", the problem's code, or the transport error's name
    job_id: str | None
    idempotency_key: str
    retry_after: str | None
    thread: int

    @property
    def seconds(self) -> float:
        return self.finished - self.started

    @property
    def accepted(self) -> bool:
        """The service took the job (200 with the image, or 202 with its Location)."""
        return self.status in (200, 202)

    @property
    def clear_error(self) -> bool:
        """A refusal the client can act on: a problem with a code, and Retry-After when retrying helps."""
        if self.status == 0 or (self.status >= 500 and self.status != 503):
            return False
        return self.code not in ("other", "") and (self.status not in (429, 503) or self.retry_after is not None)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _code(response: httpx.Response) -> str:
    if response.status_code == 200:
        return "ok"
    if response.status_code == 202:
        return "accepted"
    try:
        return str(json.loads(response.content).get("code") or "other")
    except (ValueError, AttributeError):
        return "other"


@dataclass
class Load:
    """`threads` clients, each sending one resize after another (`pause` seconds apart) until
    `duration` seconds passed or `max_requests` were sent in all. Start with start(), end with join()."""

    base_url: str
    api_key: str
    body: bytes
    threads: int = 4
    duration: float = 10.0
    max_requests: int = 10_000
    query: str = "width=96"
    pause: float = 0.0
    refusal_pause: float = 0.0  # extra wait after a 429/503 (0: a flood that ignores Retry-After)
    respond_async: bool = False
    timeout: float = 30.0
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._sent = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    def start(self) -> "Load":
        self.started = time.monotonic()
        for i in range(self.threads):
            t = threading.Thread(target=self._client, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self) -> list[Answer]:
        for t in self._threads:
            t.join(self.duration + self.timeout + 10)
        return self.answers

    def run(self) -> list[Answer]:
        return self.start().join()

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests or \
                    time.monotonic() - self.started >= self.duration:
                return False
            self._sent += 1
            return True

    def _client(self, index: int) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if self.respond_async:
            headers["Prefer"] = "respond-async"
        with httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=headers) as http:
            while self._take():
                key = f"load-{uuid.uuid4().hex}"
                started = time.monotonic()
                try:
                    response = http.post(f"/v1/resize?{self.query}", content=self.body,
                                         headers={"Idempotency-Key": key})
                    location = response.headers.get("location", "")
                    answer = Answer(started, time.monotonic(), response.status_code, _code(response),
                                    location.rsplit("/", 1)[-1] if location.startswith("/v1/jobs/") else None,
                                    key, response.headers.get("retry-after"), index)
                except httpx.HTTPError as e:
                    answer = Answer(started, time.monotonic(), 0, type(e).__name__, None, key, None, index)
                with self._lock:
                    self.answers.append(answer)
                wait = self.pause + (self.refusal_pause if answer.status in (429, 503) else 0.0)
                if wait:
                    self._stop.wait(wait)


def summary(answers: list[Answer]) -> dict[str, object]:
    """Counts by status and code, and latency percentiles (ms) of the accepted and the refused."""
    ok = [a.seconds for a in answers if a.accepted]
    refused = [a.seconds for a in answers if not a.accepted]
    return {
        "requests": len(answers),
        "by_code": dict(Counter(f"{a.status} {a.code}" for a in answers)),
        "accepted_ms": {"p50": round(percentile(ok, 0.5) * 1000, 1), "p99": round(percentile(ok, 0.99) * 1000, 1),
                        "max": round(max(ok, default=0) * 1000, 1)},
        "refused_ms": {"p50": round(percentile(refused, 0.5) * 1000, 1),
                       "p99": round(percentile(refused, 0.99) * 1000, 1),
                       "max": round(max(refused, default=0) * 1000, 1)},
    }


def error_window(answers: list[Answer], after: float = 0.0) -> tuple[float, float, float] | None:
    """(first, last, length) in seconds relative to `after` of the answers that were not accepted
    (sent at or after `after`); None when every one was accepted."""
    failed = [a for a in answers if not a.accepted and a.started >= after]
    if not failed:
        return None
    first = min(a.started for a in failed) - after
    last = max(a.finished for a in failed) - after
    return first, last, last - first


def timeline(answers: list[Answer], origin: float, start: float = -1e9, end: float = 1e9) -> list[list[object]]:
    """Runs of consecutive answers (by send time) with the same outcome, as [from s, to s, "status code",
    count] relative to `origin`: a compact picture of an outage and its recovery."""
    runs: list[list[object]] = []
    for a in sorted(answers, key=lambda a: a.started):
        offset = a.started - origin
        if not start <= offset <= end:
            continue
        label = f"{a.status} {a.code}"
        if runs and runs[-1][2] == label:
            runs[-1][1] = round(offset, 1)
            runs[-1][3] += 1  # type: ignore[operator]
        else:
            runs.append([round(offset, 1), round(offset, 1), label, 1])
    return runs


class QueueDepth:
    """The ready messages of a queue, asked of RabbitMQ itself (a passive declare) every `every`
    seconds in a thread while the `with` block runs: how many jobs waited for a worker. `samples`
    holds every reading."""

    def __init__(self, queue: str, every: float = 0.05) -> None:
        self.queue, self.every = queue, every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="queue-depth", daemon=True)

    def __enter__(self) -> "QueueDepth":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        from controlplane.celery import app

        with app.connection_for_write() as connection:
            channel = connection.channel()
            while not self._stop.is_set():
                self.samples.append(channel.queue_declare(queue=self.queue, passive=True).message_count)
                self._stop.wait(self.every)
