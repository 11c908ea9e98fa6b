"""A Celery worker of its own for a reliability test: its own quorum queue (and dead-letter queue),
its own spool, the test database, settings from the test; deleted queues afterwards."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from tests.conftest import ROOT, STAGING_DIR


@dataclass
class Worker:
    queue: str
    proc: subprocess.Popen[bytes]
    log: Path

    def children(self) -> list[int]:
        """The pool's child processes (the ones that run tasks)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, needle: str) -> int:
        return self.log_text().count(needle)


@contextmanager
def own_worker(name: str, **env: str) -> Iterator[Worker]:
    """A worker (one child) consuming the queue `test.<name>.<id>`; `env` overrides its settings."""
    from tests.processes import database_url_for_tests

    queue = f"test.{name}.{uuid.uuid4().hex[:8]}"
    log_path = STAGING_DIR.parent / f"{queue}.log"
    full_env = {**os.environ, "RESIZE_QUEUE": queue, "DATABASE_URL": database_url_for_tests(),
                "METERING_SPOOL_DIR": str(STAGING_DIR.parent / f"{queue}-spool"), "METERING_FLUSH_SECONDS": "0.2",
                "WORKER_METRICS_BIND": "", **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--concurrency", "1",
                                 "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                                 "--hostname", f"{queue}@%h"], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while b" ready." not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield Worker(queue, proc, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            delete_queues(queue)


def delete_queues(queue: str) -> None:
    from kombu import Queue

    from controlplane.celery import app

    with app.connection_for_write() as connection:
        for name in (queue, f"{queue}.dead"):
            try:
                Queue(name).bind(connection.channel()).delete()
            except Exception:
                pass


def slow_image() -> bytes:
    """A 1600×1200 JPEG of noise (~1 MB) whose resize to 4000 px PNG keeps a worker busy for seconds
    (the PNG encoder on incompressible pixels): long enough to kill the worker in the middle of it."""
    buf = io.BytesIO()
    Image.effect_noise((1600, 1200), 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


SLOW_QUERY = "width=4000&format=png&enlarge=true"
