"""The loopback topology (scripts/topology.py): a 3-node RabbitMQ cluster, two API servers behind
HAProxy, two workers, one beat and Prometheus start; resizes are served through the load balancer
by both API servers and both workers; Prometheus scrapes every target and evaluates the rules;
everything stops cleanly (exit code 0, no port left open)."""
from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from identity.services import api_key_create, customer_create
from scripts.topology import Topology, port_open
from tests.conftest import corpus
from tests.observability.test_metrics import scrape, value
from tests.processes import database_url_for_tests

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_topology_serves_through_the_load_balancer_and_stops_cleanly():
    _, key = api_key_create(customer=customer_create(name="topology"))
    t = Topology(database_url=database_url_for_tests(), api_servers=2, workers=2, scrape_interval="1s")
    t.start()
    try:
        nodes = [n.name for n in t.rabbit_nodes]
        assert t.cluster_running_nodes() == sorted(nodes)
        assert sorted(t.quorum_members()) == sorted(nodes)  # the resize queue is replicated on all three
        assert t.queue_leader() in (0, 1, 2)

        image = corpus("photo-256k-0.jpg")

        def resize(request_id: str) -> httpx.Response:
            return httpx.post(f"{t.lb_url}/v1/resize?width=96", content=image, timeout=30,
                              headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id})

        ids = [f"topo-{uuid.uuid4().hex[:10]}" for _ in range(12)]
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(resize, ids))
        assert [r.status_code for r in responses] == [200] * 12, [r.text[:200] for r in responses]
        assert [r.headers["x-request-id"] for r in responses] == ids
        assert httpx.get(f"{t.lb_url}/v1/resize", timeout=5).status_code in (401, 405)

        served = [value(scrape(f"{url}/metrics"), "resizer_resize_requests_total", outcome="served") for url in t.api_urls]
        finished = [value(scrape(url), "resizer_task_duration_seconds_count", status="succeeded")
                    for url in t.worker_metrics_urls]
        assert sum(served) == 12 and all(n > 0 for n in served), served
        assert sum(finished) == 12 and all(n > 0 for n in finished), finished
        assert "haproxy_backend_active_servers" in httpx.get(t.lb_metrics_url, timeout=5).text

        # Prometheus scrapes every target of docker/prometheus/prometheus.yml's jobs, and the rules run.
        deadline = time.monotonic() + 20
        while True:
            targets = httpx.get(f"{t.prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            health = sorted((x["labels"]["job"], x["health"]) for x in targets)
            groups = httpx.get(f"{t.prometheus_url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [r for g in groups for r in g["rules"]]
            if (all(h == "up" for _, h in health) and rules and all(r.get("lastEvaluation", "").startswith("2")
                                                                     and r["health"] == "ok" for r in rules)):
                break
            assert time.monotonic() < deadline, (health, [(r["name"], r["health"], r.get("lastError")) for r in rules])
            time.sleep(0.5)
        assert [job for job, _ in health] == sorted(
            ["api"] * 2 + ["worker"] * 2 + ["rabbitmq"] * 3 + ["rabbitmq-queues"] * 3 + ["haproxy", "prometheus"])
    finally:
        codes = t.stop()
    assert all(code == 0 for code in codes.values()), codes
    assert len(codes) == 2 + 2 + 1 + 1 + 1 + 3  # API servers, workers, beat, LB, Prometheus, broker nodes
    ports = [n.amqp_port for n in t.rabbit_nodes] + [int(u.rsplit(":", 1)[1]) for u in [t.lb_url, *t.api_urls]]
    assert not any(port_open(p) for p in ports)
