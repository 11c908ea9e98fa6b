"""`manage.py dead_letters`: an operator's way to see and put right what the broker dead-lettered, on
the real RabbitMQ, with the run's real worker taking a requeued job. Before it, the runbook's way (the
management UI's "get messages" with requeue = false) deleted the only copy of a job's message."""
from __future__ import annotations

import io
import json
import time
import uuid

import pytest
from django.core.management import CommandError, call_command
from kombu import Consumer, Exchange, Producer, Queue

import celeryconfig
from controlplane.celery import app, declare_topology
from resizer.jobs import job_create, job_fail, job_load
from resizer.staging import staging_store
from tests.conftest import corpus

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("worker")]

PARAMS = {"width": 50, "height": None, "fit": "inside", "format": "jpeg", "quality": None, "gravity": "center",
          "background": None, "enlarge": False}


def _staged_job() -> str:
    job, _ = job_create(staging_store(), customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
                        params=PARAMS, input_facts={}, data=corpus("coffee.jpg"))
    return job.id


def _dead_letter(job_ids: list[str]) -> None:
    """Each job's task message, as the API publishes it, rejected past the delivery limit on a queue with
    the resize queue's arguments (no worker consumes it): the broker dead-letters it, x-death and all.
    The dead-letter queue starts empty."""
    name = f"{celeryconfig.RESIZE_QUEUE}.poison.{uuid.uuid4().hex[:6]}"
    # An exchange of its own: on the resize exchange the resize queue's binding (<RESIZE_QUEUE>.#) would
    # take a copy too, and the run's worker would run it.
    queue = Queue(name, Exchange(name, type="topic", auto_delete=True), routing_key=f"{name}.#",
                  queue_arguments=celeryconfig.resize_queue.queue_arguments)
    with app.connection_for_write() as connection:
        channel = connection.channel()
        declare_topology(connection)
        queue.bind(channel).declare()
        try:
            for job_id in job_ids:
                headers, properties, body, _ = app.amqp.as_task_v2(
                    job_id, "resizer.tasks.resize", args=[job_id], kwargs={}, time_limit=None, soft_time_limit=None)
                Producer(channel).publish(body, exchange=queue.exchange, routing_key=f"{name}.job", headers=headers,
                                          serializer="json", delivery_mode=2, **properties)
            with Consumer(channel, [queue], callbacks=[lambda body, message: message.reject(requeue=True)]):
                deadline = time.monotonic() + 30
                while _dead_count() < len(job_ids):
                    assert time.monotonic() < deadline
                    try:
                        connection.drain_events(timeout=0.2)
                    except TimeoutError:
                        pass
        finally:
            queue.bind(channel).delete()


def _dead_count() -> int:
    with app.connection_for_write() as connection:
        return celeryconfig.dead_letter_queue.bind(connection.channel()).queue_declare(passive=True).message_count


def _run(*args: str) -> list[dict]:
    out = io.StringIO()
    call_command("dead_letters", *args, stdout=out)
    return [json.loads(line) for line in out.getvalue().splitlines() if line]


def test_dead_letters_are_listed_without_being_taken_requeued_and_dropped():
    with app.connection_for_write() as connection:
        declare_topology(connection)
        celeryconfig.dead_letter_queue.bind(connection.channel()).purge()
    waiting, finished = _staged_job(), _staged_job()
    _dead_letter([waiting, finished])
    store = staging_store()
    job_fail(store, job_load(store, finished), status=422, code="corrupt_image", detail="d")
    deadline = time.monotonic() + 10

    listed = {row["job"]: row for row in _run()}
    assert {job: (row["status"], row["reason"]) for job, row in listed.items()} == {
        waiting: ("queued", "delivery_limit"), finished: ("failed", "delivery_limit")}
    assert _dead_count() == 2  # listing took nothing away

    with pytest.raises(CommandError, match="drop their dead letters instead; nothing was changed"):
        _run("requeue", finished)
    with pytest.raises(CommandError, match="no dead letter for job"):
        _run("drop", uuid.uuid4().hex)
    assert _dead_count() == 2

    assert _run("requeue", "--all") == [{"requeued": 1, "dropped": 0, "kept": 1}]
    while (job := job_load(store, waiting)).status != "succeeded":  # the run's worker takes it
        assert time.monotonic() < deadline + 30, job
        time.sleep(0.1)
    assert [row["job"] for row in _run()] == [finished]

    # Letters copied by hand without Celery's headers: one whose body still names its job (known by it),
    # one that names none (listed, never dropped by --finished: nobody can tell what it was).
    with app.connection_for_write() as connection:
        for body in (f'[["{finished}"], {{}}, {{}}]', '[["?"], {}, {}]'):
            Producer(connection.default_channel).publish(body.encode(), exchange=celeryconfig.dead_letter_exchange,
                                                         content_type="application/json", content_encoding="utf-8")
    deadline = time.monotonic() + 10
    while _dead_count() < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert sorted((row["job"] or "", row["status"]) for row in _run()) == [
        ("", "gone"), (finished, "failed"), (finished, "failed")]
    assert _run("drop", "--finished") == [{"requeued": 0, "dropped": 2, "kept": 1}]
    assert [row["job"] for row in _run()] == [None]
    with app.connection_for_write() as connection:
        celeryconfig.dead_letter_queue.bind(connection.channel()).purge()
