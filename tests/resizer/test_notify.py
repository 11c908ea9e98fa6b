"""Result return on the real broker: a JobWaiter's reply queue receives the completion notice a
worker publishes (resizer.notify.job_notify) and wakes the request waiting on that job, only that one."""
from __future__ import annotations

import uuid

from controlplane.celery import app
from resizer.notify import JobWaiter, job_notify


def test_a_completion_notice_wakes_the_request_waiting_on_its_job() -> None:
    waiter = JobWaiter(app.connection_for_read)
    assert waiter.usable(startup_wait=10)
    done, other, unknown = (uuid.uuid4().hex for _ in range(3))
    waiter.expect(done, waiter.queue_name)
    waiter.expect(other, waiter.queue_name)
    with app.producer_or_acquire() as producer:
        job_notify(producer=producer, reply_to=waiter.queue_name, job_id=unknown, status="succeeded")  # ignored
        job_notify(producer=producer, reply_to=waiter.queue_name, job_id=done, status="succeeded")
    assert waiter.wait(done, 10)
    assert not waiter.wait(other, 0.5)  # nobody finished it
    waiter.forget(done)
    waiter.forget(other)


def test_waiting_on_a_job_nobody_expects_returns_at_once() -> None:
    """No event (never expected, or cleared past the cap): no notice can come, so wait() says "look at
    the job" at once instead of returning False again and again (a caller's busy loop)."""
    waiter = JobWaiter(app.connection_for_read)
    assert waiter.wait(uuid.uuid4().hex, 30)


def test_a_job_expected_on_a_reply_queue_the_waiter_no_longer_has_is_not_waited_for() -> None:
    """The request reads the reply queue's name, stages the job, then expects it: a reconnect in
    between renamed the queue (the notice would go to the old one, gone) and woke only the jobs
    already expected, so this one waited its whole second for a notice that could not come."""
    waiter = JobWaiter(app.connection_for_read)
    assert waiter.usable(startup_wait=10)
    stale, current = uuid.uuid4().hex, uuid.uuid4().hex
    waiter.expect(stale, "reply.a-queue-of-an-earlier-connection")
    waiter.expect(current, waiter.queue_name)
    assert waiter.wait(stale, 0)  # look at the job now
    assert not waiter.wait(current, 0.2)  # its notice can still come
