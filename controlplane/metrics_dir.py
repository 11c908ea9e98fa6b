"""Where a multi-process server's Prometheus metrics live between its processes (gunicorn's workers,
a Celery worker's pool children): one directory per server start, summed by the /metrics exporter.

Must run before anything imports prometheus_client (which picks its storage at import), so this
module imports nothing of it. See docs/adr/0005-observability.md.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set when we made the directory ourselves, so the server removes it on a clean exit.
_CREATED_ENV = "RESIZER_METRICS_DIR_CREATED"


def prepare(role: str) -> Path:
    """Give this server start a fresh, empty metrics directory and export it to its children.
    A directory named by the environment (compose, the topology script) is emptied: values from
    a previous start must not be summed with this one's."""
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        os.environ.pop(_CREATED_ENV, None)
    else:
        path = Path(tempfile.mkdtemp(prefix=f"resizer-{role}-metrics-"))
        os.environ[ENV] = str(path)
        os.environ[_CREATED_ENV] = str(path)
    return path


def cleanup() -> None:
    """On a clean exit: remove the directory if prepare() created it (a named one is left as is)."""
    created = os.environ.get(_CREATED_ENV)
    if created and created == os.environ.get(ENV):
        shutil.rmtree(created, ignore_errors=True)
