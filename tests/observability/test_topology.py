"""The loopback topology (scripts/topology.py): a 3-node RabbitMQ cluster, two API servers behind
HAProxy, two workers, one beat and Prometheus start; resizes are served through the load balancer
by both API servers and both workers; Prometheus scrapes every target and evaluates the rules;
everything stops cleanly (exit code 0, no port left open). And the CLI's safety, without starting
anything: a new topology refuses before deleting another's data, and `stop` signals only the
processes it recorded."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import scripts.topology as cli
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
        # The public frontend serves neither /metrics nor /readyz (however spelled); the nodes do.
        for path in ("/metrics", "/readyz", "/%6Detrics", "/readyz/"):
            answer = httpx.get(f"{t.lb_url}{path}", timeout=5)
            assert answer.status_code == 404 and answer.json()["code"] == "not_found", (path, answer.status_code)
        assert httpx.get(f"{t.api_urls[0]}/readyz", timeout=5).status_code == 200

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


# --- the CLI's safety (no topology is started) ------------------------------------------------------

@pytest.fixture
def cli_files(tmp_path, monkeypatch):
    """The CLI's state file, lock and run directory, in tmp_path."""
    monkeypatch.setattr(cli, "STATE_FILE", tmp_path / "state.json")
    monkeypatch.setattr(cli, "LOCK_FILE", tmp_path / "lock")
    monkeypatch.setattr(cli, "RUN_BASE", tmp_path / "run")
    (tmp_path / "run" / "api1" / "spool").mkdir(parents=True)
    (tmp_path / "run" / "api1" / "spool" / "segment.jsonl").write_text("{}\n")  # unshipped usage
    return tmp_path


@pytest.fixture
def sleepers():
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(2)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def _never(*args, **kwargs):
    raise AssertionError("a refused start must not prepare the database or delete anything")


def _refused_start(files, monkeypatch) -> int:
    monkeypatch.setattr(cli, "_prepare_database", _never)
    monkeypatch.setattr(cli.shutil, "rmtree", _never)
    code = cli.main(["start", "--no-prometheus"])
    assert (files / "run" / "api1" / "spool" / "segment.jsonl").exists()
    return code


def test_start_refuses_while_a_recorded_topology_runs(cli_files, sleepers, monkeypatch):
    cli.STATE_FILE.write_text(json.dumps({"mode": "run", "supervisor": None, "processes": [
        {"name": "api1", "signal": int(signal.SIGTERM), **cli._identity(sleepers[0].pid)}]}))
    assert _refused_start(cli_files, monkeypatch) == 1
    assert cli.STATE_FILE.exists()


def test_start_refuses_while_the_lock_is_held_or_a_port_is_taken(cli_files, monkeypatch):
    held = cli._take_lock()
    try:
        assert _refused_start(cli_files, monkeypatch) == 1
    finally:
        held.close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setitem(cli.CLI_PORTS, "lb", taken.getsockname()[1])
        assert _refused_start(cli_files, monkeypatch) == 1


def test_stop_signals_only_the_processes_it_recorded(cli_files, sleepers):
    ours, other = sleepers
    reused = cli._identity(other.pid)
    reused["start_time"] = str(int(reused["start_time"]) + 1)  # the pid now belongs to a later process
    rebooted = {**cli._identity(other.pid), "boot_id": "a-boot-before-the-last-reboot"}
    cli.STATE_FILE.write_text(json.dumps({"mode": "start", "supervisor": None, "processes": [
        {"name": "api1", "signal": int(signal.SIGTERM), **cli._identity(ours.pid)},
        {"name": "worker1", "signal": int(signal.SIGTERM), **reused},
        {"name": "worker2", "signal": int(signal.SIGTERM), **rebooted},
        {"name": "beat", "signal": int(signal.SIGTERM), "pid": other.pid},  # an old state file: no start time
    ]}))
    assert cli._stop_from_state() == 0
    assert ours.wait(10) == -signal.SIGTERM
    assert other.poll() is None  # never signalled
    assert not cli.STATE_FILE.exists()


def test_a_stale_state_file_does_not_block_a_new_topology(cli_files, sleepers):
    cli.STATE_FILE.write_text(json.dumps({"mode": "start", "supervisor": None, "processes": [
        {"name": "api1", "signal": int(signal.SIGTERM), **cli._identity(sleepers[0].pid), "boot_id": "gone"}]}))
    args = cli.argparse.Namespace(api_servers=0, workers=0, no_prometheus=True)
    refusal = cli._refusal(args)
    assert not cli.STATE_FILE.exists()
    # Only a fixed port somebody else uses on this machine could still refuse it.
    assert refusal is None or refusal.startswith("ports in use"), refusal
