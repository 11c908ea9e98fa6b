"""Shared fixtures: a private queue and staging directory per test run, a real Celery worker
process consuming that queue from the real RabbitMQ, and customers with keys in the real Postgres."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Set before anything imports celeryconfig or settings: this run's queue and staging area are
# its own, so a `make run` on the same broker (or a parallel run) never sees our jobs.
RUN_ID = uuid.uuid4().hex[:8]
os.environ["RESIZE_QUEUE"] = f"test.resize.{RUN_ID}"
STAGING_DIR = Path(tempfile.mkdtemp(prefix=f"resizer-staging-{RUN_ID}-"))
os.environ["STAGING_URL"] = f"file://{STAGING_DIR}"
# pytest-django may have read the settings already: make this process agree with its subprocesses.
from django.conf import settings  # noqa: E402

settings.STAGING_URL = os.environ["STAGING_URL"]
# In-process tests run inside a transaction no other connection can see, so the credential cache
# syncs when a test says so (from the test's own connection) instead of on its own thread.
settings.AUTH_SYNC_IN_BACKGROUND = False
settings.AUTH_SNAPSHOT_PATH = ""

# Usage records: this process spools on its own and ships when a test says so; the worker
# subprocess has its own spool and ships in the background, to the test database.
os.environ["METERING_SPOOL_DIR"] = str(STAGING_DIR.parent / f"resizer-spool-{RUN_ID}")
settings.METERING_SPOOL_DIR = os.environ["METERING_SPOOL_DIR"]
settings.METERING_SHIPPER = False
WORKER_SPOOL_DIR = STAGING_DIR.parent / f"resizer-worker-spool-{RUN_ID}"

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def make_image(fmt: str = "JPEG", size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else None).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session", autouse=True)
def _run_queues():
    """Whatever this run declared on the broker, and its staging directory, are deleted at its end."""
    yield
    _delete_queues()
    shutil.rmtree(STAGING_DIR, ignore_errors=True)


def _delete_queues() -> None:
    import celeryconfig
    from controlplane.celery import app

    with app.connection_for_write() as connection:
        channel = connection.default_channel
        for entity in (celeryconfig.resize_queue, celeryconfig.dead_letter_queue, celeryconfig.periodic_queue,
                       celeryconfig.resize_exchange, celeryconfig.dead_letter_exchange):
            try:
                entity.bind(channel).delete()
            except Exception:
                channel = connection.channel()


@pytest.fixture(scope="session")
def worker(django_db_setup):
    """A real `celery worker` process on this run's quorum queue; yields its log path. What it
    writes to Postgres (usage records) lands in the test database."""
    from tests.processes import database_url_for_tests

    log_path = STAGING_DIR.parent / f"resizer-worker-{RUN_ID}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--loglevel", "INFO",
         "--concurrency", "2", "--hostname", f"test-{RUN_ID}@%h", "--without-mingle", "--without-gossip"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "DATABASE_URL": database_url_for_tests(),
             "METERING_SPOOL_DIR": str(WORKER_SPOOL_DIR), "METERING_FLUSH_SECONDS": "0.2"},
    )
    deadline = time.monotonic() + 60
    while b" ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"celery worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    yield log_path
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def credentials(db):
    """The process's credential cache, fresh for this test; call .sync(full=True) after writes."""
    from identity.dataplane import credential_cache

    credential_cache.reset()
    cache = credential_cache()
    cache.sync(full=True)
    yield cache
    credential_cache.reset()


@pytest.fixture
def customer_key(credentials):
    """(customer, key) of a fresh active customer, already in the credential cache."""
    from identity.services import api_key_create, customer_create

    customer = customer_create(name=f"customer-{uuid.uuid4().hex[:6]}")
    _, key = api_key_create(customer=customer)
    credentials.sync(full=True)
    return customer, key


@pytest.fixture
def api(client, customer_key):
    """A Django test client that authenticates as a fresh customer."""
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {customer_key[1]}"
    return client


@pytest.fixture
def nacking_queue(monkeypatch):
    """The resize queue, for this test, is a private one that holds nothing (x-max-length 0,
    reject-publish): RabbitMQ itself nacks every publish to it, as a quorum queue does between leaders."""
    import celeryconfig
    from kombu import Exchange, Queue

    from controlplane.celery import app

    name = f"test.nacking.{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="topic", durable=False)
    queue = Queue(name, exchange, routing_key="#", durable=False,
                  queue_arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    monkeypatch.setattr(celeryconfig, "resize_exchange", exchange)
    monkeypatch.setattr(celeryconfig, "resize_queue", queue)
    yield queue
    with app.connection_for_write() as connection:
        channel = connection.channel()
        queue.bind(channel).delete()
        exchange.bind(channel).delete()
