"""Start the API (gunicorn) and a Celery worker as real processes on loopback, on a private queue
and staging directory, for benchmarks. Uses the running PostgreSQL and RabbitMQ."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from scripts.topology import free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@contextmanager
def stack(*, api_workers: int = 2, worker_concurrency: int = 2) -> Iterator[tuple[str, str]]:
    """Yields (base URL, API key). Everything it started is stopped, and its queue deleted, after."""
    run = uuid.uuid4().hex[:8]
    port = free_port()
    env = {
        **os.environ,
        "RESIZE_QUEUE": f"bench.resize.{run}",
        "STAGING_URL": f"file://{tempfile.mkdtemp(prefix=f'bench-staging-{run}-')}",
        "API_BIND": f"127.0.0.1:{port}",
        "API_WORKERS": str(api_workers),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
    }
    key = subprocess.run([sys.executable, "manage.py", "create_customer", f"bench-{run}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    log = open(tempfile.mktemp(prefix=f"bench-{run}-", suffix=".log"), "wb")
    procs = [
        subprocess.Popen([str(VENV_BIN / "gunicorn"), "-c", "controlplane/gunicorn.conf.py"], cwd=ROOT, env=env,
                         stdout=log, stderr=subprocess.STDOUT),
        subprocess.Popen([str(VENV_BIN / "celery"), "-A", "controlplane", "worker", "--loglevel", "WARNING",
                          "--concurrency", str(worker_concurrency), "--without-mingle", "--without-gossip",
                          "--hostname", f"bench-{run}@%h"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until("stack", lambda: http_ok(f"{base}/readyz"), 60, procs)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; see {log.name}") from None
        time.sleep(2)  # the worker declares its queue and starts consuming
        yield base, key
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([sys.executable, "-c", _DELETE_QUEUES], cwd=ROOT, env=env, check=False)


_DELETE_QUEUES = """
import celeryconfig
from controlplane.celery import app
with app.connection_for_write() as c:
    for q in (celeryconfig.resize_queue, celeryconfig.dead_letter_queue):
        q.bind(c.default_channel).delete()
"""
