"""/metrics in one process (the Django test client, no PROMETHEUS_MULTIPROC_DIR): the default
registry serves, with the same names; and the scrape-time readings on their own."""
from __future__ import annotations

import io
import json
import logging
import os
from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controlplane.logs import ContextFilter, json_formatter
from controlplane.metrics import SpoolCollector, outcome_of
from tests.conftest import corpus

pytestmark = pytest.mark.usefixtures("worker")


def _samples(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(response.content.decode()) for s in f.samples}


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_queue_wait_does_not_include_the_apis_own_staging_and_enqueue(api, monkeypatch):
    """queue_wait ran from the job document's creation, before the input was staged and the message
    published: a broker slow to confirm showed as queue wait, which admission control follows (ADR
    0007: it sheds queue_full with idle workers). Found by review; now it runs from the confirm."""
    import time

    from resizer import services

    original = services._send
    sent_at = []

    def slow_confirm(job_id, reply_to, timeout):  # type: ignore[no-untyped-def]
        time.sleep(0.4)  # the broker takes 0.4 s to confirm; the message is not in the queue before
        sent_at.append(time.time())
        original(job_id, reply_to, timeout)

    monkeypatch.setattr(services, "_send", slow_confirm)
    before = _samples(api)
    response = api.post("/v1/resize?width=64", data=corpus("photo-256k-0.jpg"), content_type="image/jpeg")
    assert response.status_code == 200
    after = _samples(api)

    def grew(stage: str) -> float:
        name = "resizer_resize_stage_duration_seconds_sum"
        return _sum(after, name, stage=stage) - _sum(before, name, stage=stage)

    from controlplane.metrics import parse_time

    assert grew("enqueue") >= 0.4  # the sleep is inside the publish
    # The message could wait in the queue only from its publish (after the 0.4 s) to the worker's start
    # (the job's started_at; the worker is on this host: one clock). From the document's creation, as
    # before, the wait held the 0.4 s too. Compared with the job's own times, not with a bound in seconds.
    started = parse_time(api.get(response["Location"]).json()["started_at"]).timestamp()
    assert 0 <= grew("queue_wait") <= started - sent_at[0] + 0.001, (grew("queue_wait"), started - sent_at[0])


def test_metrics_in_one_process_move_with_a_resize(api):
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    before = _samples(api)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)  # what settings.LOGGING's console handler does, into a buffer
    handler.addFilter(ContextFilter())
    handler.setFormatter(json_formatter())
    logging.getLogger().addHandler(handler)
    try:
        response = api.post("/v1/resize?width=64", data=corpus("photo-256k-0.jpg"), content_type="image/jpeg",
                            HTTP_X_REQUEST_ID="inprocess-1")
    finally:
        logging.getLogger().removeHandler(handler)
    assert response.status_code == 200 and response["X-Request-Id"] == "inprocess-1"
    answered = [json.loads(line) for line in lines.getvalue().splitlines() if '"resize answered"' in line]
    assert len(answered) == 1 and answered[0]["request_id"] == "inprocess-1"
    assert answered[0]["job_id"] == response["Location"].rsplit("/", 1)[-1] and answered[0]["outcome"] == "served"
    after = _samples(api)
    for name, labels in [("resizer_resize_request_duration_seconds_count", {"outcome": "served", "input_size": "lt_1mb"}),
                         ("resizer_resize_requests_total", {"outcome": "served", "code": "ok"}),
                         ("resizer_resize_stage_duration_seconds_count", {"stage": "enqueue"}),
                         ("resizer_resize_stage_duration_seconds_count", {"stage": "result_return"})]:
        assert _sum(after, name, **labels) - _sum(before, name, **labels) == 1, name
    # The SLO bucket is there (whether this request fell in it is a timing, not asserted); +Inf has it.
    bucket, served = "resizer_resize_request_duration_seconds_bucket", {"outcome": "served", "input_size": "lt_1mb"}
    assert any(n == bucket and {**served, "le": "0.5"}.items() <= dict(ls).items() for n, ls in after)
    assert _sum(after, bucket, **served, le="+Inf") - _sum(before, bucket, **served, le="+Inf") == 1
    assert 0 <= _sum(after, "resizer_auth_snapshot_age_seconds") < 60
    assert _sum(after, "resizer_broker_up") == 1
    assert ("resizer_metering_spool_segments", ()) in after


def test_outcomes_for_yield():
    assert [outcome_of(s) for s in (200, 202, 400, 401, 404, 413, 422, 429, 500, 503)] == [
        "served", "served", "client_error", "client_error", "client_error", "client_error", "client_error",
        "limited", "error", "shed"]


def test_spool_lag_is_the_oldest_unshipped_record(tmp_path):
    def segment(name: str, age: float) -> None:
        at = (datetime.now(timezone.utc) - timedelta(seconds=age)).isoformat()
        (tmp_path / name).write_text(json.dumps({"id": name, "event_time": at}) + "\n" + json.dumps({"id": "later"}) + "\n")

    collector = SpoolCollector(lambda: str(tmp_path))
    values = {f.name: f.samples[0].value for f in collector.collect()}
    assert values == {"resizer_metering_spool_oldest_record_age_seconds": 0.0, "resizer_metering_spool_segments": 0,
                      "resizer_metering_spool_set_aside_records": 0}  # (its first sample: rejected/)
    segment("host-1-aaaa-000001.jsonl", 30)
    segment("host-2-bbbb-000001.jsonl", 300)
    (tmp_path / "host-3-cccc-000001.jsonl").write_bytes(b"")  # a segment just created, no record yet
    (tmp_path / "rejected").mkdir()
    values = {f.name: f.samples[0].value for f in collector.collect()}
    assert 299 < values["resizer_metering_spool_oldest_record_age_seconds"] < 310
    assert values["resizer_metering_spool_segments"] == 3



def test_a_failed_publish_is_timed_in_the_enqueue_stage(api, monkeypatch, nacking_queue):
    """Only successful publishes were timed: with the broker refusing jobs, the enqueue stage's p99
    (the panel the runbook points to) looked normal. A private queue that holds nothing: the broker
    really nacks the publish."""
    import celeryconfig

    monkeypatch.setattr(celeryconfig, "PUBLISH_ATTEMPTS", 1)
    before = _samples(api)
    response = api.post("/v1/resize?width=64", data=corpus("photo-256k-0.jpg"), content_type="image/jpeg")
    assert response.status_code == 503 and response.json()["code"] == "queue_unavailable"
    after = _samples(api)
    stage = "resizer_resize_stage_duration_seconds_count"
    assert _sum(after, stage, stage="enqueue") - _sum(before, stage, stage="enqueue") == 1
