"""Start the API (gunicorn) and a Celery worker as real processes on loopback, on a private queue,
staging directory and metering spool, for benchmarks. Uses the running PostgreSQL and RabbitMQ."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scripts.topology import free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Stack:
    base: str  # the API's URL
    keys: list[str]  # one API key per customer
    api_pid: int  # gunicorn's master (its workers are its children)
    worker_pid: int  # the Celery worker's main process (its pool processes are its children)
    log: Path
    queue: str  # the resize queue (RESIZE_QUEUE)


_CUSTOMERS = """
import sys, django
django.setup()
from identity.models import Plan
from identity.services import api_key_create, customer_create
plan = Plan.objects.create(name=f"bench-{sys.argv[1]}", rate_per_second=10_000, burst=10_000)
for i in range(int(sys.argv[2])):
    print(api_key_create(customer=customer_create(name=f"bench-{sys.argv[1]}-{i}", plan=plan))[1])
"""


@contextmanager
def stack(*, api_workers: int = 2, worker_concurrency: int = 2, customers: int = 1,
          env: dict[str, str] | None = None, worker_nice: int = 0, worker_pool: str = "prefork") -> Iterator[Stack]:
    """The API (gunicorn) and a worker on a private queue, staging directory and spool, with
    `customers` customers on a plan whose rate limit is out of the way. Everything it started is
    stopped, and its queues deleted, after. `worker_pool="solo"` runs `worker_concurrency` separate
    single-process workers instead (`celery worker -P solo`, no time limits: an experiment, ADR 0008)."""
    run = uuid.uuid4().hex[:8]
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{run}-"))
    env = {
        **os.environ,
        "RESIZE_QUEUE": f"bench.resize.{run}",
        "STAGING_URL": f"file://{scratch / 'staging'}",
        "METERING_SPOOL_DIR": str(scratch / "spool"),
        "AUTH_SNAPSHOT_PATH": str(scratch / "auth-snapshot.json"),
        "API_BIND": f"127.0.0.1:{port}",
        "API_WORKERS": str(api_workers),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
        **(env or {}),
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    keys = subprocess.run([sys.executable, "-c", _CUSTOMERS, run, str(customers)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout.split()
    log_path = scratch / "stack.log"
    log = open(log_path, "wb")
    procs = [
        subprocess.Popen([str(VENV_BIN / "gunicorn"), "-c", "controlplane/gunicorn.conf.py"], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT),
        _worker(worker_pool, worker_concurrency, worker_nice, run, env, log),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until("stack", lambda: http_ok(f"{base}/readyz"), 60, procs)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log_path}") from None
        time.sleep(2)  # the worker declares its queue and starts consuming
        yield Stack(base=base, keys=keys, api_pid=procs[0].pid, worker_pid=procs[1].pid, log=log_path,
                    queue=env["RESIZE_QUEUE"])
    finally:
        try:
            os.killpg(procs[1].pid, signal.SIGTERM)  # the worker's process group (several, with -P solo)
        except ProcessLookupError:
            pass
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([sys.executable, "-c", _DELETE_QUEUES], cwd=ROOT, env=env, check=False)


def _worker(pool: str, concurrency: int, nice: int, run: str, env: dict[str, str], log) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """The Celery worker in its own process group: one prefork worker with `concurrency` children, or
    `concurrency` solo workers under a shell (each with its own metrics port)."""
    command = [str(VENV_BIN / "celery"), "-A", "controlplane", "worker", "--loglevel", "WARNING", "--without-mingle",
               "--without-gossip"]
    if pool == "prefork":
        argv = ["nice", "-n", str(nice), *command, "--concurrency", str(concurrency), "--hostname", f"bench-{run}@%h"]
    else:
        argv = ["nice", "-n", str(nice), "bash", "-c", " & ".join(
            f"WORKER_METRICS_BIND=127.0.0.1:{free_port()} {shlex.join(command)} -P solo --hostname bench-{run}-{i}@%h"
            for i in range(concurrency)) + " & wait"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


_DELETE_QUEUES = """
import celeryconfig
from controlplane.celery import app
with app.connection_for_write() as c:
    for q in (celeryconfig.resize_queue, celeryconfig.dead_letter_queue, celeryconfig.periodic_queue):
        q.bind(c.default_channel).delete()
"""
