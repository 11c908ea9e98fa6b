"""The Celery application shared by the API (publisher), the resize workers and beat."""
from __future__ import annotations

import os
import sys
from functools import partial

from celery import Celery
from celery.signals import (task_postrun, task_prerun, worker_init, worker_process_init,
                            worker_ready, worker_shutdown)
from celery.worker.consumer import Consumer

import celeryconfig
from controlplane import logs, metrics_dir

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
if "worker" in sys.argv[1:]:
    # A worker's pool children write their metrics to files the main process exports: this must
    # happen before anything imports prometheus_client (docs/adr/0005-observability.md).
    metrics_dir.prepare("worker")


class WorkerConsumer(Consumer):
    """The worker's broker consumer, reconnecting sooner than Celery's default after the broker was
    away (2 s, then 2 s more per round of the listed nodes, up to 30 s: jobs accepted as soon as the
    broker returns would wait that long for a worker). Here: 0.5 s more per round, up to 5 s."""

    def __init__(self, *args, worker_options=None, **kwargs):  # type: ignore[no-untyped-def]
        # No event heartbeat, gossip or mingle, whatever the command line says (task events stay off
        # by worker_send_task_events; `-E` would turn those on): the heartbeat (every 2 s, for monitors
        # such as Flower; not the AMQP heartbeat) and gossip were the only events sent, and nothing
        # here reads them. The heartbeat's publish waits for its confirm with no bound, in the worker's
        # main thread: a resource alarm on the broker froze every worker for as long as it lasted, its
        # queue at 0 consumers (the failure review of 2026-11-23).
        worker_options = {**(worker_options or {}), "without_heartbeat": True, "without_gossip": True,
                          "without_mingle": True}
        super().__init__(*args, worker_options=worker_options, **kwargs)

    def ensure_connected(self, conn):  # type: ignore[no-untyped-def]
        conn.ensure_connection = partial(conn.ensure_connection, interval_start=0.5, interval_step=0.5,
                                         interval_max=5)
        return super().ensure_connected(conn)


app = Celery("resizer")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["resizer"])


def declare_topology(connection) -> None:
    """Declare the resize queue, its dead-letter queue and beat's queue (idempotent; same arguments)."""
    channel = connection.default_channel
    for queue in (celeryconfig.resize_queue, celeryconfig.dead_letter_queue, celeryconfig.periodic_queue):
        queue.bind(channel).declare()


@worker_ready.connect
def _declare_on_worker_ready(sender, **_: object) -> None:
    with sender.app.connection_for_write() as connection:
        declare_topology(connection)


@worker_process_init.connect
def _bound_worker_memory(**_: object) -> None:
    """Cap each worker child's address space, so one image cannot exhaust the host: past the cap
    an allocation fails with MemoryError, which fails that job (`image_too_complex`) and nothing else."""
    import resource

    limit = celeryconfig.WORKER_MAX_ADDRESS_SPACE_MIB * 2**20
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --- observability (docs/adr/0005-observability.md) ---------------------------------------------
task_prerun.connect(logs.task_context_set)
task_postrun.connect(logs.task_context_clear)


@worker_init.connect
def _export_worker_metrics(**_: object) -> None:
    from django.conf import settings

    from resizer.metrics import exporter_start

    exporter_start(settings.WORKER_METRICS_BIND)


@worker_process_init.connect
def _start_usage_shipping(**_: object) -> None:
    """Each child ships the host's spool from its start, not from its first job (metering/services.py)."""
    from metering.services import local_spool

    local_spool()


@worker_shutdown.connect
def _worker_metrics_cleanup(**_: object) -> None:
    metrics_dir.cleanup()
