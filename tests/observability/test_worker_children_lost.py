"""A pool child that dies records nothing itself: the worker's main process counts it
(`resizer_worker_children_lost_total{reason}`, on the worker's own /metrics, through the metrics
directory like every other worker metric) and drops the dead child's live gauges from that directory.
Real workers, real SIGKILLs, a real hard time limit."""
from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families

from controlplane.celery import app
from resizer.jobs import job_create, job_load
from resizer.metrics import child_lost_reason
from resizer.staging import staging_store
from tests.processes import Worker, free_port, own_worker
from tests.reliability.workers import slow_image

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LOST = "resizer_worker_children_lost_total"


def _lost(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == LOST}


def _wait(what: str, check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return result


def _new_children(worker: Worker, old: set[int], count: int) -> list[int]:
    return _wait("the pool did not replace its child",
                 lambda: (pids if len(pids := [p for p in worker.children() if p not in old]) >= count else None))


def test_a_child_killed_is_counted_by_the_main_process_and_its_live_gauges_dropped(tmp_path):
    port, metrics_dir = free_port(), tmp_path / "metrics"
    with own_worker("lost", concurrency=2, WORKER_METRICS_BIND=f"127.0.0.1:{port}",
                    PROMETHEUS_MULTIPROC_DIR=str(metrics_dir)) as worker:
        _wait("the exporter did not answer", lambda: LOST in httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        # Exported at 0 from the start (rate() sees the first death), by the main process.
        assert _lost(port) == {"time_limit": 0, "killed": 0, "signal": 0, "exited": 0}
        first, second = _wait("no pool children", lambda: c if len(c := worker.children()) == 2 else None)
        # A live gauge file as a child that set a livesum/livemin gauge leaves it (none of the worker's
        # own gauges is one today): the main process must remove it when the child is killed.
        live = metrics_dir / f"gauge_livesum_{first}.db"
        values = MmapedDict(str(live))
        values.write_value(mmap_key("test_live", "test_live", [], [], "a live gauge"), 1.0, 0.0)
        values.close()
        assert "test_live 1.0" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        os.kill(first, signal.SIGKILL)
        os.kill(second, signal.SIGSEGV)
        _wait("the deaths were not counted", lambda: _lost(port)["killed"] == 1 and _lost(port)["signal"] == 1)
        assert not live.exists()
        # The pool replaced both; their counters files stay (a counter never goes back).
        _new_children(worker, {first, second}, 2)
        assert _lost(port) == {"time_limit": 0, "killed": 1, "signal": 1, "exited": 0}
        assert f"worker child {first} lost (killed" in worker.log_text()


def test_a_child_killed_at_the_hard_time_limit_is_counted_as_such(tmp_path):
    port = free_port()
    with own_worker("timelimit", WORKER_METRICS_BIND=f"127.0.0.1:{port}", TASK_TIME_LIMIT="2",
                    TASK_SOFT_TIME_LIMIT="0", JOB_MAX_ATTEMPTS="1") as worker:
        _wait("the exporter did not answer", lambda: LOST in httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        job, _ = job_create(staging_store(), customer_id=str(uuid.uuid4()), key_id=str(uuid.uuid4()), request_id="r",
                            params={"width": 4000, "height": None, "fit": "inside", "format": "png", "quality": None,
                                    "gravity": "center", "background": None, "enlarge": True},
                            input_facts={}, data=slow_image())
        # No limits in the message, as the API publishes it: with resizer.tasks imported in this process
        # (the full suite), send_task put this process's task limits (30 s) in it, which the worker obeys
        # over its own 2 s, and the job ran to its end.
        app.send_task("resizer.tasks.resize", args=[job.id], task_id=job.id, exchange=worker.queue,
                      routing_key=f"{worker.queue}.job", time_limit=None, soft_time_limit=None)
        _wait("the child was not killed at the time limit", lambda: _lost(port)["time_limit"] >= 1, 30)
        assert "Hard time limit (2s) exceeded" in worker.log_text()
        # The redelivery is past the attempt budget (1): failed, no second kill.
        _wait("the job did not fail", lambda: job_load(staging_store(), job.id).finished, 30)
        assert _lost(port) == {"time_limit": 1, "killed": 0, "signal": 0, "exited": 0}


def test_reasons_by_exit_status():
    assert child_lost_reason(0, timed_out=False) is None
    assert child_lost_reason(0x9B, timed_out=False) is None  # billiard's recycle (max memory per child)
    assert child_lost_reason(-signal.SIGKILL, timed_out=False) == "killed"
    assert child_lost_reason(-signal.SIGKILL, timed_out=True) == "time_limit"
    assert child_lost_reason(-signal.SIGSEGV, timed_out=False) == "signal"
    assert child_lost_reason(1, timed_out=False) == "exited"
