"""The broker topology on the real RabbitMQ: a quorum queue whose delivery limit dead-letters a
poison message instead of letting it loop, and a worker that gives up on a job that keeps dying."""
from __future__ import annotations

import json
import subprocess
import time

from kombu import Consumer, Exchange, Producer, Queue

import celeryconfig
from controlplane.celery import app, declare_topology


def _rabbitmqctl_queue(name: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
                         capture_output=True, text=True, timeout=60).stdout
    return next((line for line in out.splitlines() if line.split("\t")[0] == name), "")


def _rabbitmqctl_queue_arguments(name: str) -> dict:
    """The queue's declared arguments as RabbitMQ holds them ({name: value}), parsed from
    rabbitmqctl's JSON (each argument is [name, AMQP type, value])."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "arguments", "--formatter", "json"],
                         capture_output=True, text=True, timeout=60).stdout
    queue = next((q for q in json.loads(out) if q["name"] == name), None)
    assert queue is not None, f"queue {name} is not on the broker"
    return {arg_name: value for arg_name, _type, value in queue["arguments"]}


def test_resize_queue_is_quorum_with_delivery_limit_and_dead_letter(worker):
    line = _rabbitmqctl_queue(celeryconfig.RESIZE_QUEUE)
    assert "\tquorum\t" in line
    arguments = _rabbitmqctl_queue_arguments(celeryconfig.RESIZE_QUEUE)
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == celeryconfig.DELIVERY_LIMIT
    assert arguments["x-dead-letter-exchange"] == f"{celeryconfig.RESIZE_QUEUE}.dlx"
    assert "\tquorum\t" in _rabbitmqctl_queue(f"{celeryconfig.RESIZE_QUEUE}.dead")


def test_a_message_rejected_past_the_delivery_limit_is_dead_lettered():
    # A separate queue with the same arguments as the resize queue, so no worker competes for it.
    name = f"{celeryconfig.RESIZE_QUEUE}.poison"
    queue = Queue(name, celeryconfig.resize_exchange, routing_key=f"{name}.#",
                  queue_arguments=celeryconfig.resize_queue.queue_arguments)
    dead = celeryconfig.dead_letter_queue
    with app.connection_for_write() as connection:
        channel = connection.channel()
        declare_topology(connection)
        queue.bind(channel).declare()
        dead.bind(channel).purge()
        try:
            Producer(channel).publish({"poison": True}, exchange=queue.exchange, routing_key=f"{name}.x",
                                      declare=[queue])
            deliveries = 0

            def reject(body, message):
                nonlocal deliveries
                deliveries += 1
                message.reject(requeue=True)

            deadline = time.monotonic() + 30
            with Consumer(channel, [queue], callbacks=[reject]):
                while time.monotonic() < deadline:
                    try:
                        connection.drain_events(timeout=0.5)
                    except TimeoutError:
                        if deliveries:
                            break
            assert deliveries == celeryconfig.DELIVERY_LIMIT + 1
            message = None
            for _ in range(20):
                message = dead.bind(channel).get(accept=["json"])
                if message is not None:
                    break
                time.sleep(0.1)
            assert message is not None and message.payload == {"poison": True}
            message.ack()
        finally:
            queue.bind(channel).delete()


def test_a_job_is_published_as_celerys_task_message_declaring_its_queue(monkeypatch):
    """resizer.services._send publishes without apply_async: the message must still be the one
    Celery's worker expects (protocol 2), carry the request id, and declare the queue if it is missing
    (a message to an exchange with no queue bound would be confirmed and dropped). A private exchange
    and queue, which do not exist yet, so the test's worker does not take the message."""
    from controlplane import logs
    from resizer import services

    name = f"{celeryconfig.RESIZE_QUEUE}.send"
    exchange = Exchange(name, type="topic", durable=True)
    queue = Queue(name, exchange, routing_key="#", queue_arguments={"x-queue-type": "quorum"})
    monkeypatch.setattr(celeryconfig, "resize_exchange", exchange)
    monkeypatch.setattr(celeryconfig, "resize_queue", queue)
    token = logs.request_id_var.set("r" * 32)
    try:
        services._send("j" * 32, "reply.queue", 5.0)
        # The second publish on the pooled connection skips the declaration kombu remembers.
        services._send("k" * 32, "reply.queue", 5.0)
    finally:
        logs.request_id_var.reset(token)
    with app.connection_for_write() as connection:
        channel = connection.channel()
        try:
            assert "\tquorum\t" in _rabbitmqctl_queue(name)
            assert queue.bind(channel).queue_declare(passive=True).message_count == 2
            message = queue.bind(channel).get(accept=["json"])
            assert message is not None
            headers, props = message.headers, message.properties
            assert headers["task"] == "resizer.tasks.resize" and headers["id"] == "j" * 32
            assert headers["timelimit"] == [None, None]  # the worker's own limits apply
            assert headers[logs.TASK_HEADER] == "r" * 32
            assert props["reply_to"] == "reply.queue" and props["correlation_id"] == "j" * 32
            assert message.delivery_info["routing_key"] == services.RESIZE_ROUTING_KEY
            args, kwargs, _embed = message.payload
            assert args == ["j" * 32] and kwargs == {}
            message.ack()
        finally:
            queue.bind(channel).delete()
            exchange.bind(channel).delete()
