"""The Celery application shared by the API (publisher), the resize workers and beat."""
from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_ready

import celeryconfig

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("resizer")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["resizer"])


def declare_topology(connection) -> None:
    """Declare the resize queue and its dead-letter queue (idempotent; same arguments every time)."""
    channel = connection.default_channel
    for queue in (celeryconfig.resize_queue, celeryconfig.dead_letter_queue):
        queue.bind(channel).declare()


@worker_ready.connect
def _declare_on_worker_ready(sender, **_: object) -> None:
    with sender.app.connection_for_write() as connection:
        declare_topology(connection)
