"""The resize workers' Prometheus metrics, exported by each worker's main process on its own port
(WORKER_METRICS_BIND) as the sum of its pool's children (controlplane/metrics_dir.py).

Per delivery of a job: wall and CPU seconds by how it ended, the input and output sizes, the
failures by their stable code, and how long the job waited in the queue. In the main process: the
pool's children that died (killed, crashed, or cut at the hard time limit), which never finish their
own measurements. At scrape time: the metering lag of this host's spool. No label carries a customer id.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

TASK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0)
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BYTES_BUCKETS = tuple(float(1024 * 4**i) for i in range(10))  # 1 KiB .. 256 MiB

# statuses of a delivery: succeeded / failed (the job finished here), replayed (it had finished
# before: only re-announced), dropped (no job document), requeued (the staging store was away).
TASK_SECONDS = Histogram("resizer_task_duration_seconds", "Wall time of one delivery of a resize job, by how it ended.",
                         ["status"], buckets=TASK_BUCKETS)
TASK_CPU_SECONDS = Histogram("resizer_task_cpu_seconds", "CPU time of the worker process during one delivery.",
                             ["status"], buckets=TASK_BUCKETS)
JOB_INPUT_BYTES = Histogram("resizer_job_input_bytes", "Size of the images the jobs read, by input format.",
                            ["format"], buckets=BYTES_BUCKETS)
JOB_OUTPUT_BYTES = Histogram("resizer_job_output_bytes", "Size of the images the jobs wrote, by output format.",
                             ["format"], buckets=BYTES_BUCKETS)
JOB_QUEUE_WAIT = Histogram("resizer_job_queue_wait_seconds",
                           "From the job's creation by the API to its start on a worker (two hosts' clocks).",
                           ["queue"], buckets=WAIT_BUCKETS)
JOBS_FAILED = Counter("resizer_jobs_failed", "Jobs that finished failed, by their stable error code.", ["code"])
# Counted by the worker's main process (controlplane/worker_pool.py): a child that dies mid-job records
# no duration and no failure of its own, and its job is delivered again (after JOB_MAX_ATTEMPTS such
# deaths it fails processing_failed, a client-error code).
CHILD_LOST_REASONS = ("time_limit", "killed", "signal", "exited")
CHILDREN_LOST = Counter(
    "resizer_worker_children_lost",
    "Pool children that died other than by a clean exit or recycling, by reason: time_limit (the worker "
    "killed it at the task's hard time limit), killed (SIGKILL from elsewhere: the OOM killer, an "
    "operator), signal (another signal: a segfault, an abort), exited (a non-zero exit status).",
    ["reason"],
)


def child_lost_reason(exitcode: int | None, *, timed_out: bool) -> str | None:
    """Why a pool child ended, for CHILDREN_LOST; None for a clean exit (0, or billiard's recycle
    status 155 after max tasks or memory per child)."""
    if timed_out:
        return "time_limit"
    if exitcode is None or exitcode in (0, 0x9B):
        return None
    if exitcode == -signal.SIGKILL:
        return "killed"
    return "signal" if exitcode < 0 else "exited"


def child_exited(pid: int, exitcode: int | None, *, timed_out: bool = False, controlled: bool = False) -> str | None:
    """In the worker's main process, once a pool child has been reaped: count it if it died (unless
    the pool ended it on purpose: a revoke with terminate, a shrink), and drop its live gauges from
    the metrics directory (a child killed by a signal never ran its own worker_process_shutdown; its
    counters and histograms stay summed, as they must). Returns the reason counted, if any."""
    reason = None if controlled and not timed_out else child_lost_reason(exitcode, timed_out=timed_out)
    if reason is not None:
        CHILDREN_LOST.labels(reason).inc()
        log.warning("worker child %s lost (%s, exit status %s)", pid, reason, exitcode)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
    return reason


class TaskMeter:
    """Measures one delivery: create before running the job, then finish() with what job_run returned."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._replayed = False

    def replayed(self) -> None:
        """The job had finished before this delivery: it was only announced again (job_run says so)."""
        self._replayed = True

    def finish(self, job: Any, *, requeued: bool = False) -> str:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        if requeued:
            status = "requeued"
        elif job is None:
            status = "dropped"
        else:
            # Not by its finished_at: a delivery that finishes a job an earlier one decided (and timed)
            # is the one that finished it.
            status = "replayed" if self._replayed else job.status
        TASK_SECONDS.labels(status).observe(wall)
        TASK_CPU_SECONDS.labels(status).observe(cpu)
        if status in ("succeeded", "failed"):
            if (queue_wait := job.queue_wait()) is not None:
                JOB_QUEUE_WAIT.labels(self.queue).observe(queue_wait)
            if job.input and job.input.get("bytes") is not None:
                JOB_INPUT_BYTES.labels(str(job.input.get("format") or "unknown")).observe(job.input["bytes"])
            if job.output and job.output.get("bytes") is not None:
                JOB_OUTPUT_BYTES.labels(str(job.output.get("format") or "unknown")).observe(job.output["bytes"])
            if status == "failed":
                JOBS_FAILED.labels(str((job.error or {}).get("code") or "unknown")).inc()
            log.info("job %s", status, extra={
                "status": status, "duration_ms": round(wall * 1000, 2), "cpu_ms": round(cpu * 1000, 2),
                "attempts": job.attempts, "error_code": (job.error or {}).get("code"),
            })
        return status


def exporter_start(bind: str) -> int | None:
    """Serve this worker's metrics (all its pool's processes, plus the spool's lag) on `bind`
    (host:port). Returns the port, or None when disabled ("" or port 0) or the port is taken."""
    import prometheus_client
    from django.conf import settings

    from controlplane.metrics import SpoolCollector, CollectorGroup, process_registry

    host, _, port = bind.rpartition(":")
    if not port or int(port) == 0:
        return None
    # The usual series exist at 0 from the start (a counter first seen at 5 hides its first 5 from
    # rate()); created here, before the pool forks, each child then writes its own.
    import celeryconfig

    for status in ("succeeded", "failed"):
        TASK_SECONDS.labels(status)
        TASK_CPU_SECONDS.labels(status)
    JOB_QUEUE_WAIT.labels(celeryconfig.RESIZE_QUEUE)
    for reason in CHILD_LOST_REASONS:
        CHILDREN_LOST.labels(reason)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    spool = SpoolCollector(lambda: settings.METERING_SPOOL_DIR)
    registry.register(CollectorGroup([process_registry(), spool]))  # type: ignore[arg-type]
    try:
        prometheus_client.start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)
    except OSError as e:
        log.warning("worker metrics not exported on %s: %s", bind, e)
        return None
    log.info("worker metrics on http://%s/metrics", bind)
    return int(port)
