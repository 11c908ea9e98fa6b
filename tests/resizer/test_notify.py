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
    waiter.expect(done)
    waiter.expect(other)
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
