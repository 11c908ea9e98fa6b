"""The broker topology on the real RabbitMQ: a quorum queue whose delivery limit dead-letters a
poison message instead of letting it loop, and a worker that gives up on a job that keeps dying."""
from __future__ import annotations

import subprocess
import time

from kombu import Consumer, Producer, Queue

import celeryconfig
from controlplane.celery import app, declare_topology


def _rabbitmqctl_queue(name: str) -> str:
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "type", "arguments"],
                         capture_output=True, text=True, timeout=60).stdout
    return next((line for line in out.splitlines() if line.split("\t")[0] == name), "")


def test_resize_queue_is_quorum_with_delivery_limit_and_dead_letter(worker):
    line = _rabbitmqctl_queue(celeryconfig.RESIZE_QUEUE)
    assert "\tquorum\t" in line
    assert "x-delivery-limit" in line and str(celeryconfig.DELIVERY_LIMIT) in line
    assert f"{celeryconfig.RESIZE_QUEUE}.dlx" in line
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
