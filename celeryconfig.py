"""Every broker, queue, retry, time-limit and beat setting of the Celery tier, in one place.

The resize queue is a RabbitMQ quorum queue (Raft-replicated): publishers wait for confirms,
workers ack late and take one message at a time, and a delivery limit with a dead-letter queue
stops a poison message from looping. See docs/adr/0001-queue-topology.md.
"""
from __future__ import annotations

from typing import Any

from kombu import Exchange, Queue

from controlplane.env import env_float, env_int, env_str
from resizer import broker_alarm

# Several nodes may be listed, separated by ';' (kombu fails over between them in order).
broker_url = env_str("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
broker_connection_timeout = env_float("BROKER_CONNECTION_TIMEOUT", 2.0)
broker_connection_retry_on_startup = True
# A worker retries the broker for as long as it is away (a restart would change nothing), and sooner
# than Celery's default (controlplane/celery.py, WorkerConsumer).
broker_connection_max_retries = None
worker_consumer = "controlplane.celery:WorkerConsumer"
broker_heartbeat = 10
broker_transport_options = {
    # Publisher confirms: a publish returns only once the quorum queue's leader has the message
    # replicated to a majority, so an accepted job survives the loss of a node.
    "confirm_publish": True,
    # A resource alarm's connection.blocked ends a publish's confirm wait at once (resizer/broker_alarm.py).
    "on_blocked": broker_alarm.on_blocked,
    "on_unblocked": broker_alarm.on_unblocked,
}

# Publish + confirm must finish within this or the API answers 503 (the job was not accepted).
PUBLISH_TIMEOUT_SECONDS = env_float("PUBLISH_TIMEOUT_SECONDS", 5.0)
# Pooled producers: one for every API thread, so no publish waits for another's producer (Celery's
# default of 10 was below the API's 16 threads and its in-flight limit of 12), and a wait for one
# is bounded all the same (OperationalError: answered 503 queue_unavailable).
broker_pool_limit = max(10, env_int("API_THREADS", 16, minimum=1))
broker_pool_acquire_timeout = PUBLISH_TIMEOUT_SECONDS
# A publish the broker nacks (a quorum queue between leaders for ~0.5 s after its leader's node died)
# is tried again, up to this many times in all, within the timeout above, with exponential backoff and
# jitter from PUBLISH_RETRY_BASE_SECONDS. Safe: the job's id is the message's, so a duplicate runs once.
PUBLISH_ATTEMPTS = env_int("PUBLISH_ATTEMPTS", 5, minimum=1)
PUBLISH_RETRY_BASE_SECONDS = env_float("PUBLISH_RETRY_BASE_SECONDS", 0.1)

RESIZE_QUEUE = env_str("RESIZE_QUEUE", "resize")
# Our own attempt budget (the task marks the job failed past it) sits below the broker's delivery
# limit, which stays as the backstop for a message whose job document cannot even be read.
# The delivery limit is an argument of the queue's declaration, which RabbitMQ fixes when the queue is
# first declared: a different value later is refused (406 inequivalent arg), and every publish and
# worker start with it fails. It defaults to JOB_MAX_ATTEMPTS + 2 (as it always has: a deployment's
# queues were declared so); before changing JOB_MAX_ATTEMPTS on a live deployment, pin DELIVERY_LIMIT
# to the value its queues have (docs/OPERATIONS.md). Keep JOB_MAX_ATTEMPTS below it: the worker must
# see the delivery that fails the job.
JOB_MAX_ATTEMPTS = env_int("JOB_MAX_ATTEMPTS", 3, minimum=1)
DELIVERY_LIMIT = env_int("DELIVERY_LIMIT", JOB_MAX_ATTEMPTS + 2, minimum=1)
# A job whose staging store (or usage spool) fails is put back as a fresh message, its delivery count
# at 0, for this long from the first failure (resizer.tasks): an outage longer than the delivery
# limit's pauses (~10-15 s) dead-lettered every job in flight. Past it, the delivery limit ends the
# retries (the dead letters wait for `manage.py dead_letters requeue`). 0: never put back fresh.
STORE_OUTAGE_RETRY_SECONDS = env_float("STORE_OUTAGE_RETRY_SECONDS", 3600.0)

resize_exchange = Exchange(RESIZE_QUEUE, type="topic", durable=True)
dead_letter_exchange = Exchange(f"{RESIZE_QUEUE}.dlx", type="fanout", durable=True)
resize_queue = Queue(
    RESIZE_QUEUE,
    resize_exchange,
    routing_key=f"{RESIZE_QUEUE}.#",
    queue_arguments={
        "x-queue-type": "quorum",
        # RabbitMQ 3.10 has no default delivery limit: without this a crashing message loops forever.
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": dead_letter_exchange.name,
        # at-least-once dead-lettering needs reject-publish overflow; nothing dead-lettered is dropped.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    },
)
# Messages that exhausted their deliveries wait here for an operator (never consumed by workers).
dead_letter_queue = Queue(
    f"{RESIZE_QUEUE}.dead",
    dead_letter_exchange,
    routing_key="#",
    queue_arguments={"x-queue-type": "quorum"},
)

# Beat's tasks (sweep, rollup, billing, archive) on a queue of their own: on the resize queue they
# counted in its depth (which admission refuses on) and waited behind resizes. Bound on `periodic.#`,
# outside the resize queue's `resize.#`. Workers consume both; a message beat sent while no worker ran
# expires after its interval (beat sends the next one), so runs never pile up.
periodic_queue = Queue(
    f"{RESIZE_QUEUE}.periodic",
    resize_exchange,
    routing_key="periodic.#",
    queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT},
)

task_default_queue_type = "quorum"
task_default_exchange_type = "topic"
task_default_queue = RESIZE_QUEUE
task_default_exchange = RESIZE_QUEUE
task_default_routing_key = f"{RESIZE_QUEUE}.default"
task_queues = (resize_queue, periodic_queue)
_PERIODIC_ROUTE = {"queue": periodic_queue.name, "routing_key": "periodic.task"}
task_routes = {  # first match wins
    "resizer.tasks.staging_sweep": _PERIODIC_ROUTE,
    "metering.tasks.*": _PERIODIC_ROUTE,
    "resizer.tasks.*": {"queue": RESIZE_QUEUE, "routing_key": f"{RESIZE_QUEUE}.job"},
}
task_create_missing_queues = False

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True  # results travel on the reply queue and live in the staging store
task_acks_late = True
task_reject_on_worker_lost = True
# A task that raised is acked (the job document records the failure); one killed at the hard time
# limit is requeued, so the job's attempt budget (JOB_MAX_ATTEMPTS) decides when to give up on it.
task_acks_on_failure = True
task_acks_on_timeout = False
worker_prefetch_multiplier = 1
# Celery's prefork pool, plus a count of the children that die (killed, crashed, cut at the hard time
# limit) kept by the worker's main process: a dead child records nothing itself (docs/adr/0005).
worker_pool = "controlplane.worker_pool:MeteredTaskPool"
# A channel the broker closed (a consumer timeout, a queue deleted under the worker) is reopened, as a
# lost connection is, instead of stopping the worker.
broker_channel_error_retry = True
worker_detect_quorum_queues = True
# The worker's own limits apply (the API publishes none). A soft limit of 0 means none: the hard limit
# then kills the child without warning and the job is redelivered (its attempt budget still holds).
task_soft_time_limit = env_int("TASK_SOFT_TIME_LIMIT", 20, minimum=0) or None
task_time_limit = env_int("TASK_TIME_LIMIT", 30, minimum=2)
# The beat tasks (rollup, billing, archive, staging sweep) are not resizes: a month's billing run or a
# rollup after a long beat outage takes minutes in one transaction, and the resize limits above would
# cut it (rolled back, then again every run, forever). Their own limits, seconds; below RabbitMQ's
# consumer_timeout (30 min by default, counted from the delivery, so a message prefetched behind a
# long task uses some of it waiting), past which the broker closes the worker's channel for an unacked
# delivery (acks are late): the worker reopens it (broker_channel_error_retry) and every delivery
# unacked on it is returned and runs again.
PERIODIC_TASK_SOFT_TIME_LIMIT = env_int("PERIODIC_TASK_SOFT_TIME_LIMIT", 1500, minimum=1)
PERIODIC_TASK_TIME_LIMIT = env_int("PERIODIC_TASK_TIME_LIMIT", 1700, minimum=2)
PERIODIC_TASK_LIMITS = {"soft_time_limit": PERIODIC_TASK_SOFT_TIME_LIMIT, "time_limit": PERIODIC_TASK_TIME_LIMIT}
# Each worker child's address space (RLIMIT_AS), MiB; 0 = unbounded. Sized for the 50 MP input limit:
# decoding and resizing one such image needs ~0.6 GiB on top of the ~0.12 GiB a child maps at rest.
WORKER_MAX_ADDRESS_SPACE_MIB = env_int("WORKER_MAX_ADDRESS_SPACE_MIB", 2048, minimum=0)
# A worker child that grew past this (KiB) is replaced after its task: one huge image can't ratchet memory.
worker_max_memory_per_child = env_int("WORKER_MAX_MEMORY_KIB", 1_000_000, minimum=1)
worker_hijack_root_logger = False
worker_send_task_events = False
task_send_sent_event = False

# A publish that cannot reach the broker fails fast so the API can answer 503 instead of hanging:
# kombu reconnects (to the next listed node) and retries twice, then gives up. A nack is retried twice
# at once on the same connection (resizer.services._retry_policy), then with backoff by
# resizer.services (PUBLISH_ATTEMPTS above).
task_publish_retry = True
task_publish_retry_policy = {
    "max_retries": 2,
    "interval_start": 0.05,
    "interval_step": 0.2,
    "interval_max": 0.5,
}

def _every(task: str, seconds: float) -> dict[str, Any]:
    """A beat entry whose message expires after its own interval (the next one is on its way). Its
    message carries no time limits: apply_async would copy the task's, as computed in beat's
    environment, and the worker obeys a message's limits over its own PERIODIC_TASK_* settings."""
    return {"task": task, "schedule": seconds,
            "options": {"expires": seconds, "time_limit": None, "soft_time_limit": None}}


beat_schedule = {
    "staging-sweep": _every("resizer.tasks.staging_sweep", env_float("STAGING_SWEEP_SECONDS", 60.0)),
    # Metering (docs/adr/0004): each run recomputes whole windows, so a repeated run is harmless.
    "usage-rollup": _every("metering.tasks.usage_rollup", env_float("USAGE_ROLLUP_SECONDS", 60.0)),
    "billing-run": _every("metering.tasks.billing_run", env_float("BILLING_RUN_SECONDS", 300.0)),
    "usage-archive": _every("metering.tasks.usage_archive", env_float("USAGE_ARCHIVE_SECONDS", 3600.0)),
}
# Task modules outside the autodiscovered `resizer` package.
imports = ("metering.tasks",)
beat_schedule_filename = env_str("BEAT_SCHEDULE_FILE", "var/celerybeat-schedule")
