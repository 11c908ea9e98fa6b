"""The API's own cost for one resize request, in-process: `POST /v1/resize` with `Prefer: respond-async`
through Django's WSGI application (no gunicorn, no worker, no waiting), the upload staged and the job
published to the running RabbitMQ. Reports the request thread's CPU per request and Python function
calls per request (a count that does not drift with the machine's speed, unlike the time).

    .venv/bin/python bench/bench_api_path.py [--requests 3000] [--input photo-256k-1.jpg] [--profile]
    SORT=cumulative TOP=70 .venv/bin/python bench/bench_api_path.py --profile   # the profile's order and length

Uses the running PostgreSQL (database `resizer`, one customer named api-path-*) and RabbitMQ (a private
queue, deleted after); stages into a directory under /dev/shm (deleted after). Compare two commits by
running it in a worktree of each, alternately: run-to-run noise here is about ±15%.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"


@contextmanager
def in_process_api(name: str, env: dict[str, str]) -> Iterator[tuple[Any, str]]:
    """The API's WSGI application in this process, on a private queue (`bench.<name>.<id>`), staging
    directory and spool under /dev/shm, with one customer of its own (`<name>-<id>`, on a plan whose
    rate is out of the way) and its logs written to nowhere; yields (application, the customer's key).
    `env`: more settings. The queue and the directory are deleted after."""
    run = uuid.uuid4().hex[:8]
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    os.environ.update({
        "RESIZE_QUEUE": f"bench.{name}.{run}", "STAGING_URL": f"file://{scratch / 'staging'}",
        "METERING_SPOOL_DIR": str(scratch / "spool"), "AUTH_SNAPSHOT_PATH": str(scratch / "snapshot.json"),
        "DJANGO_SETTINGS_MODULE": "controlplane.settings", **env,
    })
    sys.path.insert(0, str(ROOT))
    import logging

    import django

    django.setup()
    from controlplane.celery import app
    from controlplane.wsgi import application
    from identity.models import Plan
    from identity.services import api_key_create, customer_create

    devnull = open(os.devnull, "w")  # after the WSGI import: it configures logging again
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(devnull)  # the access log is written (its cost counts), to nowhere

    plan = Plan.objects.create(name=f"{name}-{run}", rate_per_second=1e6, burst=1_000_000)
    key = api_key_create(customer=customer_create(name=f"{name}-{run}", plan=plan))[1]
    try:
        yield application, key
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(os.environ["RESIZE_QUEUE"])
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--input", default="photo-256k-1.jpg")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions (thread CPU)")
    args = parser.parse_args()
    # No worker: the queue only grows, so admission control's depth bound is off.
    with in_process_api("api-path", {"ADMISSION_MAX_QUEUE_DEPTH": "0"}) as (application, key):
        _measure(application, key, args)


def _measure(application: Any, key: str, args: argparse.Namespace) -> None:
    body = (CORPUS / args.input).read_bytes()
    statuses: list[str] = []

    def request() -> None:
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": "/v1/resize", "QUERY_STRING": "width=256&height=256&quality=85",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr,
            "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "image/jpeg", "HTTP_HOST": "127.0.0.1:8000",
            "HTTP_AUTHORIZATION": f"Bearer {key}", "HTTP_PREFER": "respond-async",
        }
        response = application(environ, lambda status, headers, exc_info=None: statuses.append(status))
        b"".join(response)
        response.close()

    for _ in range(100):  # warm-up: connections, snapshot, caches
        request()
    if not statuses[-1].startswith("202"):
        sys.exit(f"expected 202, got {statuses[-1]}")
    start = time.thread_time()
    for _ in range(args.requests):
        request()
    cpu = (time.thread_time() - start) / args.requests
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(200):
        request()
    profile.disable()
    stats = pstats.Stats(profile)
    calls = sum(entry[1] for entry in stats.stats.values()) / 200  # type: ignore[attr-defined]
    print(f"{args.input}: {cpu * 1000:.3f} ms of request-thread CPU per request, {calls:.0f} Python calls "
          f"per request ({args.requests} requests, all {statuses[-1]})")
    if args.profile:
        stats.sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "30")))


if __name__ == "__main__":
    main()
