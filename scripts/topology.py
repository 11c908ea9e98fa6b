#!/usr/bin/env python3
"""The production topology of docker/compose.yml as plain processes on loopback, for hosts without
a container engine and for the reliability tests: a 3-node RabbitMQ cluster (quorum queues, the
prometheus plugin) on its own ports, N API servers (gunicorn) behind HAProxy, M Celery workers,
exactly one beat, and Prometheus scraping all of it with docker/prometheus's rules. PostgreSQL is
the host's (its own database). The machine's RabbitMQ on 5672 is never touched.

    .venv/bin/python scripts/topology.py run     # foreground, prints the endpoints; Ctrl-C (TERM, HUP) stops all
    .venv/bin/python scripts/topology.py start   # in the background (state in var/topology/state.json)
    .venv/bin/python scripts/topology.py stop    # stops what `start` (or a `run`) started, in order, cleanly

`start` and `run` refuse, before touching var/topology/run (the cluster's data, the staging store,
spools of usage not yet shipped), while another topology holds the lock, is recorded as running,
or has left a process on one of the fixed ports. The state file records each process's start time
and the boot it belongs to: `stop` signals only processes that are still the ones recorded.

From Python (tests, the chaos suite):

    with topology(api_servers=2, workers=2) as t:
        httpx.post(f"{t.lb_url}/v1/resize?width=64", ...)
        t.kill_rabbit_node(t.queue_leader())        # SIGKILL a node; t.start_rabbit_node(i) brings it back
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
RABBIT_SBIN = Path("/usr/lib/rabbitmq/bin")  # the Debian package's scripts, run without its root wrapper
STATE_FILE = ROOT / "var" / "topology" / "state.json"
# Held (flock) by a `start` until its state file is written and by a `run` for as long as it runs.
LOCK_FILE = ROOT / "var" / "topology" / "lock"
RUN_BASE = ROOT / "var" / "topology" / "run"

# A node stopped alone (a rolling restart) leaves HAProxy's rotation before it stops serving: longer
# than this topology's checks take to mark it down (inter 1s x fall 2; compose: 6 s for inter 2s). A
# whole topology's stop waits it out once, the API servers stopping together.
API_DRAIN_SECONDS = "3"
# Fixed ports of the CLI (tests ask for free ones): the cluster sits beside the machine's 5672.
CLI_PORTS = {"amqp": 5681, "dist": 25681, "management": 15681, "rabbit_prometheus": 15691, "api": 8001,
             "lb": 8080, "lb_metrics": 8404, "worker_metrics": 9801, "prometheus": 9090}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except Exception:
        return False


def wait_until(what: str, check: Any, timeout: float, procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Poll `check` until true; RuntimeError when `timeout` passes or one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while not check():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{what}: a process exited ({dead[0].args!r} -> {dead[0].returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:.0f} s")
        time.sleep(0.2)


def haproxy_config(lb_port: int, metrics_port: int, api_urls: Sequence[str], api_workers: int = 2) -> str:
    """The same load balancing as docker/haproxy/haproxy.cfg, on loopback ports, in front of `api_urls`
    (gunicorn servers of `api_workers` processes of 16 threads: maxconn as the file sizes it)."""
    servers = "\n".join(f"    server api{i + 1} {url.removeprefix('http://')} check inter 1s fall 2 rise 2"
                        f" maxconn {api_workers * 14}" for i, url in enumerate(api_urls))
    template = (ROOT / "docker" / "haproxy" / "haproxy.cfg").read_text()
    return (template.replace("bind :8080", f"bind 127.0.0.1:{lb_port}")
            .replace("bind :8404", f"bind 127.0.0.1:{metrics_port}")
            .replace(" resolvers docker", "")  # loopback addresses, nothing to resolve
            .replace("maxconn 20000", "maxconn 4000")  # within a shell's file descriptor limit
            .split("    # servers\n")[0] + "    # servers\n" + servers + "\n")


@dataclass
class Process:
    """One process we started: its role, how it was started, where it logs."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # A session of its own: a Ctrl-C at the terminal reaches only us, and we stop them in order.
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int | None = None) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig or self.stop_signal)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@dataclass
class RabbitNode:
    index: int
    name: str  # e.g. rz1a2b3c4d-1@localhost
    amqp_port: int
    dist_port: int
    management_port: int
    prometheus_port: int
    base: Path
    process: Process | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def beam_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


@dataclass
class Topology:
    """Start with start() (or use topology() below); every endpoint is an attribute once started."""

    api_servers: int = 2
    api_workers: int = 2
    workers: int = 2
    worker_concurrency: int = 1
    rabbit_nodes_count: int = 3
    prometheus: bool = True
    scrape_interval: str = "5s"
    database_url: str = ""
    queue: str = "resize"
    fixed_ports: bool = False  # the CLI's well-known ports; tests take free ones
    base: Path | None = None
    keep: bool = False  # keep the base directory (logs) after stop
    log_level: str = "INFO"
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_id = uuid.uuid4().hex[:8]
        self._own_base = self.base is None
        self.base = Path(self.base or tempfile.mkdtemp(prefix=f"resizer-topology-{self.run_id}-"))
        self.rabbit_nodes: list[RabbitNode] = []
        self.apis: list[Process] = []
        self.api_urls: list[str] = []
        self.worker_procs: list[Process] = []
        self.worker_metrics_urls: list[str] = []
        self.beat: Process | None = None
        self.lb: Process | None = None
        self.prometheus_proc: Process | None = None
        self.lb_url = self.lb_metrics_url = self.prometheus_url = ""
        self._ports: dict[str, int] = dict(CLI_PORTS)

    # --- ports and environment ------------------------------------------------------------------

    def _port(self, kind: str, offset: int = 0) -> int:
        if self.fixed_ports:
            port = self._ports[kind] + offset
            if port_open(port):
                raise RuntimeError(f"port {port} ({kind}) is taken: is another topology running? (`stop` it)")
            return port
        return free_port()

    @property
    def broker_urls(self) -> list[str]:
        return [node.url for node in self.rabbit_nodes]

    def broker_url(self, rotate: int = 0) -> str:
        """Every node, listed from a different one per process so connections spread over the cluster."""
        urls = self.broker_urls
        k = rotate % len(urls)
        return ";".join(urls[k:] + urls[:k])

    def _env(self, rotate: int, **extra: str) -> dict[str, str]:
        assert self.base is not None
        env = {k: v for k, v in os.environ.items()
               if k not in ("PROMETHEUS_MULTIPROC_DIR", "RESIZER_METRICS_DIR_CREATED", "METERING_SPOOL_DIR")}
        env.update({
            "DJANGO_SETTINGS_MODULE": "controlplane.settings",
            "DATABASE_URL": self.database_url,
            "BROKER_URL": self.broker_url(rotate),
            "STAGING_URL": f"file://{self.base / 'staging'}",
            "RESIZE_QUEUE": self.queue,
            "LOG_LEVEL": self.log_level,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **extra,
        })
        return env

    # --- RabbitMQ -------------------------------------------------------------------------------

    def _rabbit_env(self, node: RabbitNode) -> dict[str, str]:
        assert self.base is not None
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.base / "rabbit"),  # its own Erlang cookie, not the machine's broker's
            "LANG": "C.UTF-8",
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "rabbit" / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def rabbitmqctl(self, index: int, *args: str, tool: str = "rabbitmqctl", timeout: float = 60) -> str:
        """Run a RabbitMQ CLI tool against node `index` (0-based); returns its output."""
        node = self.rabbit_nodes[index]
        result = subprocess.run([str(RABBIT_SBIN / tool), "-n", node.name, *args], env=self._rabbit_env(node),
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            why = result.stderr.strip() or result.stdout.strip()
            raise RuntimeError(f"{tool} {' '.join(args)} on {node.name}: {why}")
        return result.stdout

    def _rabbit_prepare(self) -> None:
        assert self.base is not None
        home = self.base / "rabbit"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        (home / "rabbitmq-env.conf").write_text("")  # ignore /etc/rabbitmq/rabbitmq-env.conf (the machine's node)
        prefix = f"rz{self.run_id}"
        for i in range(self.rabbit_nodes_count):
            node = RabbitNode(index=i, name=f"{prefix}-{i + 1}@localhost", amqp_port=self._port("amqp", i),
                              dist_port=self._port("dist", i), management_port=self._port("management", i),
                              prometheus_port=self._port("rabbit_prometheus", i), base=home / f"node{i + 1}")
            node.base.mkdir(parents=True, exist_ok=True)
            self.rabbit_nodes.append(node)
        first = self.rabbit_nodes[0].name
        for node in self.rabbit_nodes:
            # The same settings as docker/rabbitmq/rabbitmq.conf, on loopback ports; every node joins the
            # first at its first boot (later boots rejoin from their own data).
            (node.base / "rabbitmq.conf").write_text("\n".join([
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}",
                f"management.tcp.port = {node.management_port}",
                "management.tcp.ip = 127.0.0.1",
                f"prometheus.tcp.port = {node.prometheus_port}",
                "prometheus.tcp.ip = 127.0.0.1",
                "cluster_formation.peer_discovery_backend = classic_config",
                f"cluster_formation.classic_config.nodes.1 = {first}",
                "cluster_partition_handling = pause_minority",
                "collect_statistics_interval = 5000",
                "",
            ]))
            (node.base / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")

    def start_rabbit_node(self, index: int, *, wait: bool = True) -> None:
        """Start (or restart, with its data: it rejoins the cluster) node `index`."""
        node = self.rabbit_nodes[index]
        node.process = Process(f"rabbit{index + 1}", [str(RABBIT_SBIN / "rabbitmq-server")], self._rabbit_env(node),
                               node.base / "stdout.log")
        node.process.start()
        if wait:
            self.wait_rabbit_node(index)

    def wait_rabbit_node(self, index: int, timeout: float = 90) -> None:
        node = self.rabbit_nodes[index]
        wait_until(f"RabbitMQ {node.name}", lambda: port_open(node.amqp_port), timeout,
                   [node.process.proc] if node.process and node.process.proc else [])
        self.rabbitmqctl(index, "await_startup", "--timeout", str(int(timeout)))

    def stop_rabbit_node(self, index: int, timeout: float = 60) -> int | None:
        """A clean stop of one node (SIGTERM: the node leaves gracefully)."""
        node = self.rabbit_nodes[index]
        if node.process is None:
            return None
        node.process.signal(signal.SIGTERM)
        return node.process.wait(timeout)

    def kill_rabbit_node(self, index: int) -> None:
        """SIGKILL the node's Erlang VM: a crash, not a shutdown (the chaos suite's tool)."""
        node = self.rabbit_nodes[index]
        pid = node.beam_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if node.process is not None:
            node.process.wait(30)

    def _alive_node(self) -> int:
        return next(i for i, n in enumerate(self.rabbit_nodes) if n.process and n.process.alive())

    def queue_leader(self, queue: str | None = None) -> int:
        """The index of the node that leads a quorum queue (the resize queue by default)."""
        out = self.rabbitmqctl(self._alive_node(), "list_queues", "name", "leader", "--formatter", "json", "--quiet")
        leaders = {q["name"]: q["leader"] for q in json.loads(out)}
        leader = leaders[queue or self.queue]
        return next(i for i, n in enumerate(self.rabbit_nodes) if n.name == leader)

    def quorum_members(self, queue: str | None = None) -> list[str]:
        out = self.rabbitmqctl(self._alive_node(), "list_queues", "name", "members", "--formatter", "json", "--quiet")
        return next(q["members"] for q in json.loads(out) if q["name"] == (queue or self.queue))

    def cluster_running_nodes(self) -> list[str]:
        out = self.rabbitmqctl(self._alive_node(), "cluster_status", "--formatter", "json")
        return sorted(json.loads(out)["running_nodes"])

    def _queue_consumers(self) -> int:
        from kombu import Connection

        try:
            with Connection(self.broker_url(), connect_timeout=2) as connection:
                _, _, consumers = connection.default_channel.queue_declare(queue=self.queue, passive=True)
                return consumers
        except Exception:
            return -1

    # --- the application tier -------------------------------------------------------------------

    def _haproxy_config(self) -> str:
        lb_port, metrics_port = int(self.lb_url.rsplit(":", 1)[1]), int(self.lb_metrics_url.split(":")[2].split("/")[0])
        return haproxy_config(lb_port, metrics_port, self.api_urls, self.api_workers)

    def _prometheus_config(self) -> str:
        """docker/prometheus/prometheus.yml's jobs and rules, pointed at the loopback targets."""
        import yaml

        assert self.base is not None
        config = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = self.scrape_interval
        config["global"]["evaluation_interval"] = self.scrape_interval
        config["rule_files"] = [str(ROOT / "docker" / "prometheus" / "rules" / "*.yml")]
        targets = {
            "api": [u.removeprefix("http://") for u in self.api_urls],
            "worker": [u.removeprefix("http://").removesuffix("/metrics") for u in self.worker_metrics_urls],
            "rabbitmq": [f"127.0.0.1:{n.prometheus_port}" for n in self.rabbit_nodes],
            "rabbitmq-queues": [f"127.0.0.1:{n.prometheus_port}" for n in self.rabbit_nodes],
            "haproxy": [self.lb_metrics_url.removeprefix("http://").removesuffix("/metrics")],
            "prometheus": [self.prometheus_url.removeprefix("http://")],
        }
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
            job.pop("relabel_configs", None)
        return yaml.safe_dump(config, sort_keys=False)

    def start(self) -> "Topology":
        assert self.base is not None
        if not shutil.which("haproxy"):
            raise RuntimeError("haproxy is not installed: run scripts/services.sh (or `make services`) first")
        if not self.database_url:
            raise RuntimeError("database_url is required")
        started = time.monotonic()
        try:
            self._rabbit_prepare()
            # The first node alone, then the others join it: a quorum queue is declared (by the
            # workers, below) only once all three are members, so it gets all three as replicas.
            self.start_rabbit_node(0)
            for i in range(1, self.rabbit_nodes_count):
                self.start_rabbit_node(i, wait=False)
            for i in range(1, self.rabbit_nodes_count):
                self.wait_rabbit_node(i)
            wait_until("RabbitMQ cluster", lambda: len(self.cluster_running_nodes()) == self.rabbit_nodes_count, 30)

            logs = self.base / "logs"
            for i in range(self.api_servers):
                port = self._port("api", i)
                self.api_urls.append(f"http://127.0.0.1:{port}")
                d = self.base / f"api{i + 1}"
                # --no-control-socket: gunicorn's control socket has one path per host by default.
                self.apis.append(Process(f"api{i + 1}", [str(VENV_BIN / "gunicorn"), "-c", "controlplane/gunicorn.conf.py",
                                                        "--no-control-socket"],
                                         self._env(i, API_BIND=f"127.0.0.1:{port}", API_WORKERS=str(self.api_workers),
                                                   API_DRAIN_SECONDS=API_DRAIN_SECONDS,
                                                   AUTH_SNAPSHOT_PATH=str(d / "identity-snapshot.json"),
                                                   PROMETHEUS_MULTIPROC_DIR=str(d / "metrics"),
                                                   METERING_SPOOL_DIR=str(d / "spool")),
                                         logs / f"api{i + 1}.log"))
            for j in range(self.workers):
                port = self._port("worker_metrics", j)
                self.worker_metrics_urls.append(f"http://127.0.0.1:{port}/metrics")
                d = self.base / f"worker{j + 1}"
                self.worker_procs.append(Process(
                    f"worker{j + 1}",
                    [str(VENV_BIN / "celery"), "-A", "controlplane", "worker", "--loglevel", self.log_level,
                     "--concurrency", str(self.worker_concurrency), "--hostname", f"worker{j + 1}-{self.run_id}@%h",
                     "--without-mingle", "--without-gossip"],
                    self._env(j, WORKER_METRICS_BIND=f"127.0.0.1:{port}", PROMETHEUS_MULTIPROC_DIR=str(d / "metrics"),
                              METERING_SPOOL_DIR=str(d / "spool")),
                    logs / f"worker{j + 1}.log"))
            self.beat = Process("beat",
                                [str(VENV_BIN / "celery"), "-A", "controlplane", "beat", "--loglevel", self.log_level],
                                self._env(0, BEAT_SCHEDULE_FILE=str(self.base / "beat" / "celerybeat-schedule"),
                                          METERING_SPOOL_DIR=str(self.base / "beat" / "spool")),
                                logs / "beat.log")
            (self.base / "beat").mkdir(parents=True, exist_ok=True)
            self.lb_url = f"http://127.0.0.1:{self._port('lb')}"
            self.lb_metrics_url = f"http://127.0.0.1:{self._port('lb_metrics')}/metrics"
            (self.base / "haproxy.cfg").write_text(self._haproxy_config())
            # SIGUSR1: a soft stop (stop listening, finish the requests in flight, exit 0).
            self.lb = Process("haproxy",
                              [shutil.which("haproxy") or "haproxy", "-db", "-f", str(self.base / "haproxy.cfg")],
                              {"PATH": os.environ.get("PATH", "")}, logs / "haproxy.log", stop_signal=signal.SIGUSR1)
            for p in [*self.apis, *self.worker_procs, self.beat, self.lb]:
                p.start()
            if self.prometheus:
                self._prometheus_start()

            app = [p.proc for p in [*self.apis, *self.worker_procs, self.beat] if p.proc]
            for url in self.api_urls:
                wait_until(f"API {url}", lambda url=url: http_ok(f"{url}/readyz"), 60, app)
            for url in self.worker_metrics_urls:
                wait_until(f"worker metrics {url}", lambda url=url: http_ok(url), 60, app)
            wait_until("workers consuming", lambda: self._queue_consumers() >= self.workers, 60, app)
            # Through the load balancer /healthz is a node's answer only once HAProxy has a node up (its
            # own 503 until then); /readyz and /metrics are not served on the public frontend.
            wait_until(f"load balancer {self.lb_url}", lambda: http_ok(f"{self.lb_url}/healthz"), 30,
                       [self.lb.proc] if self.lb.proc else [])
            self.started_in = time.monotonic() - started
            return self
        except BaseException:
            self.stop()
            raise

    def _prometheus_start(self) -> None:
        assert self.base is not None
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: run scripts/services.sh (or `make services`) first")
        self.prometheus_url = f"http://127.0.0.1:{self._port('prometheus')}"
        (self.base / "prometheus.yml").write_text(self._prometheus_config())
        self.prometheus_proc = Process(
            "prometheus",
            [binary, f"--config.file={self.base / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.base / 'prometheus-data'}",
             f"--web.listen-address={self.prometheus_url.removeprefix('http://')}", "--log.level=warn"],
            {"PATH": os.environ.get("PATH", "")}, self.base / "logs" / "prometheus.log")
        self.prometheus_proc.start()

    def processes(self) -> list[Process]:
        nodes = [n.process for n in self.rabbit_nodes if n.process]
        return [p for p in [self.lb, *self.apis, self.beat, *self.worker_procs, self.prometheus_proc, *nodes] if p]

    def stop(self, timeout: float = 60) -> dict[str, int | None]:
        """Stop everything, the front first: the load balancer, the API servers, beat, the workers
        (they finish their task), Prometheus, then the broker nodes. Returns each exit code."""
        codes: dict[str, int | None] = {}
        tiers = [[self.lb], self.apis, [self.beat], self.worker_procs, [self.prometheus_proc],
                 [n.process for n in self.rabbit_nodes]]
        for tier in tiers:
            procs = [p for p in tier if p is not None and p.proc is not None]
            for p in procs:
                p.signal()
            for p in procs:
                codes[p.name] = p.wait(timeout)
        if self._own_base and not self.keep and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
        return codes

    def endpoints(self) -> dict[str, Any]:
        return {
            "load_balancer": self.lb_url,
            "load_balancer_metrics": self.lb_metrics_url,
            "api_servers": self.api_urls,
            "worker_metrics": self.worker_metrics_urls,
            "rabbitmq": [{"node": n.name, "amqp": n.url, "management": f"http://127.0.0.1:{n.management_port}",
                          "prometheus": f"http://127.0.0.1:{n.prometheus_port}/metrics"} for n in self.rabbit_nodes],
            "broker_url": self.broker_url(),
            "prometheus": self.prometheus_url or None,
            "database_url": self.database_url,
            "base": str(self.base),
        }


@contextmanager
def topology(**options: Any) -> Iterator[Topology]:
    """A started topology, stopped (and its directory removed) afterwards."""
    t = Topology(**options).start()
    try:
        yield t
    finally:
        t.stop()


# --- the command line -----------------------------------------------------------------------------

def _prepare_database(url: str) -> None:
    """Create the topology's database if missing, and migrate it (the CLI's; tests bring theirs)."""
    import psycopg
    from psycopg import sql

    name = url.rsplit("/", 1)[1].split("?")[0]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "controlplane.settings"}
    subprocess.run([str(VENV_BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env,
                   check=True)


def _demo_key(url: str) -> str:
    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "controlplane.settings", "LOG_LEVEL": "WARNING"}
    out = subprocess.run([str(VENV_BIN / "python"), "manage.py", "create_customer", "topology", "--reuse"], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


def _print_endpoints(t: Topology, key: str) -> None:
    e = t.endpoints()
    print(f"""
  Topology up in {t.started_in:.0f} s (logs and data in {e['base']}):
    load balancer     {e['load_balancer']}   (HAProxy; its metrics at {e['load_balancer_metrics']})
    API servers       {'  '.join(e['api_servers'])}   (each: /metrics, /readyz)
    worker metrics    {'  '.join(e['worker_metrics'])}
    RabbitMQ nodes    {'  '.join(n['amqp'] for n in e['rabbitmq'])}
      management      {'  '.join(n['management'] for n in e['rabbitmq'])}   (guest/guest from loopback)
    Prometheus        {e['prometheus'] or 'off'}
    database          {e['database_url']}

  A key for the customer `topology`:  {key}
  Try:  curl -sS -H "Authorization: Bearer {key}" --data-binary @../shared/corpus/photo-256k-0.jpg \\
          "{e['load_balancer']}/v1/resize?width=256" -o thumb.jpg -D -
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "start", "stop", "status"])
    parser.add_argument("--api-servers", type=int, default=int(os.environ.get("TOPOLOGY_API_SERVERS", 2)))
    parser.add_argument("--api-workers", type=int, default=int(os.environ.get("TOPOLOGY_API_WORKERS", 2)))
    parser.add_argument("--workers", type=int, default=int(os.environ.get("TOPOLOGY_WORKERS", 2)))
    parser.add_argument("--worker-concurrency", type=int, default=int(os.environ.get("TOPOLOGY_WORKER_CONCURRENCY", 1)))
    parser.add_argument("--no-prometheus", action="store_true")
    parser.add_argument("--database-url", default=os.environ.get(
        "TOPOLOGY_DATABASE_URL", "postgres://postgres:postgres@127.0.0.1:5432/resizer_topology"))
    args = parser.parse_args(argv)

    if args.command == "stop":
        return _stop_from_state()
    if args.command == "status":
        return _status()
    lock = _take_lock()
    if lock is None:
        print(f"another topology is starting or running (it holds {LOCK_FILE}); `stop` it first", file=sys.stderr)
        return 1
    try:
        # Everything that could say another topology is alive is checked before anything is deleted:
        # var/topology/run holds its RabbitMQ data, staging store and spools of usage not yet shipped.
        refusal = _refusal(args)
        if refusal:
            print(f"{refusal}; nothing was changed", file=sys.stderr)
            return 1
        _prepare_database(args.database_url)
        shutil.rmtree(RUN_BASE, ignore_errors=True)
        t = Topology(api_servers=args.api_servers, api_workers=args.api_workers, workers=args.workers,
                     worker_concurrency=args.worker_concurrency, prometheus=not args.no_prometheus,
                     database_url=args.database_url, fixed_ports=True, base=RUN_BASE, keep=True,
                     scrape_interval="5s")
        return _start(t, args) if args.command == "start" else _run(t, args)
    finally:
        lock.close()  # releases the flock


def _start(t: Topology, args: argparse.Namespace) -> int:
    """`start`: bring it up, record it, leave it running in the background."""
    signals = _StopSignals()  # INT, TERM, HUP while starting: stop what started, once
    try:
        t.start()
        _write_state(t, "start")
    except KeyboardInterrupt:
        signals.stopping = True
        t.stop()
        _remove_state(lambda state: state.get("owner") == _identity(os.getpid()))
        _say("topology: interrupted while starting; stopped what had started")
        return 1
    finally:
        signals.restore()
    _print_endpoints(t, _demo_key(args.database_url))
    print("  Stop with: .venv/bin/python scripts/topology.py stop  (or make topology-stop)")
    return 0


def _run(t: Topology, args: argparse.Namespace) -> int:
    """`run`: in the foreground until a process exits or we are told to stop (INT, TERM, HUP, or
    `topology.py stop` from elsewhere, which signals us); then everything stops, in order."""
    signals = _StopSignals()
    try:
        t.start()
        _write_state(t, "run")
        _print_endpoints(t, _demo_key(args.database_url))
        _say("  Ctrl-C stops everything (or, from another shell: scripts/topology.py stop).", stream=sys.stdout)
        while all(p.alive() for p in t.processes()):
            time.sleep(1)
        dead = [p.name for p in t.processes() if not p.alive()]
        _say(f"topology: {', '.join(dead)} exited; stopping the rest")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        signals.stopping = True  # a signal from now on changes nothing: the stop below goes on
        _say("topology: stopping...")
        codes = t.stop()
        _remove_state(lambda state: (state.get("supervisor") or {}).get("pid") == os.getpid())
        _say(f"topology: stopped ({', '.join(f'{k}={v}' for k, v in codes.items())})")


class _StopSignals:
    """INT, TERM and HUP (a closed terminal) all mean: stop cleanly. The first raises KeyboardInterrupt
    (also where SIGINT is ignored, in the background); later ones, or any once `stopping` is set, do
    nothing, so the orderly stop they asked for is not cut short."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stopping = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _say(message: str, stream: Any = None) -> None:
    """Print, ignoring a terminal that has gone (after a hangup writes fail with EIO): stopping must go on."""
    try:
        print(message, file=stream or sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# --- the state file, the lock, and who is running ---------------------------------------------------

def _take_lock() -> Any:
    """The lock `start` holds until its state file is written and `run` for its whole life; None if taken."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    handle = open(LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the third (the state) on; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The second field, the command in parentheses, may itself hold spaces and parentheses.
    return stat[stat.rindex(")") + 2:].split()


def _identity(pid: int | None) -> dict[str, Any]:
    """What tells this process from a later one with the same pid: the boot, and its start time there
    (clock ticks since boot, /proc/<pid>/stat's 22nd field; it survives exec)."""
    fields = _proc_stat(pid) if pid else None
    return {"pid": pid, "start_time": fields[19] if fields and len(fields) > 19 else None, "boot_id": _boot_id()}


def _is_recorded_process(entry: dict[str, Any] | None) -> bool:
    """Whether the recorded pid is still that process (same boot, same start time) and not a zombie."""
    if not entry or not entry.get("pid") or not entry.get("start_time") or not entry.get("boot_id"):
        return False
    if entry["boot_id"] != _boot_id():
        return False  # recorded before a reboot: whatever has the pid now is something else
    fields = _proc_stat(int(entry["pid"]))
    return fields is not None and fields[0] != "Z" and len(fields) > 19 and fields[19] == entry["start_time"]


def _unverifiable(entry: dict[str, Any]) -> bool:
    """A process recorded without its start time (a state file from before these checks) whose pid exists."""
    if entry.get("start_time") or not entry.get("pid"):
        return False
    try:
        os.kill(int(entry["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_state(t: Topology, mode: str) -> None:
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "mode": mode,
        "owner": _identity(os.getpid()),
        # A foreground `run` is stopped through itself: it stops its processes in order.
        "supervisor": _identity(os.getpid()) if mode == "run" else None,
        "endpoints": t.endpoints(),
        "processes": [{"name": p.name, "signal": int(p.stop_signal), **_identity(p.pid)} for p in t.processes()],
    }
    partial = STATE_FILE.with_name(STATE_FILE.name + ".new")
    partial.write_text(json.dumps(state, indent=2))
    os.replace(partial, STATE_FILE)


def _read_state() -> dict[str, Any] | None:
    try:
        return json.loads(STATE_FILE.read_text())
    except FileNotFoundError:
        return None


def _remove_state(is_ours: Any) -> None:
    """Remove the state file if it is still the one `is_ours(state)` recognizes (never another's)."""
    try:
        state = _read_state()
    except (OSError, ValueError):
        return
    if state is not None and is_ours(state):
        STATE_FILE.unlink(missing_ok=True)


def _cli_ports(args: argparse.Namespace) -> dict[int, str]:
    """The fixed ports a CLI topology of this shape listens on (Topology._port's choices)."""
    ports: dict[int, str] = {}
    for i in range(Topology.rabbit_nodes_count):
        for kind in ("amqp", "dist", "management", "rabbit_prometheus"):
            ports[CLI_PORTS[kind] + i] = kind
    ports.update({CLI_PORTS["api"] + i: "api" for i in range(args.api_servers)})
    ports.update({CLI_PORTS["worker_metrics"] + j: "worker_metrics" for j in range(args.workers)})
    ports.update({CLI_PORTS["lb"]: "lb", CLI_PORTS["lb_metrics"]: "lb_metrics"})
    if not args.no_prometheus:
        ports[CLI_PORTS["prometheus"]] = "prometheus"
    return ports


def _refusal(args: argparse.Namespace) -> str | None:
    """Why a new CLI topology must not start (and must not delete the run directory), or None."""
    try:
        state = _read_state()
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} cannot be read ({e}): remove it once nothing of that topology runs"
    if state is not None:
        entries = [state.get("supervisor"), *state.get("processes", [])]
        if any(_is_recorded_process(e) for e in entries) or any(_unverifiable(e) for e in state.get("processes", [])):
            return f"a topology is already running ({STATE_FILE}); `stop` it first"
        print(f"topology: {STATE_FILE} was stale (none of its processes runs): removed", file=sys.stderr)
        STATE_FILE.unlink(missing_ok=True)
    taken = [f"{port} ({kind})" for port, kind in sorted(_cli_ports(args).items()) if port_open(port)]
    if taken:
        return (f"ports in use: {', '.join(taken)}: is another topology (or something else) running on them? "
                "Stop it first")
    return None


def _status() -> int:
    try:
        state = _read_state()
    except (OSError, ValueError) as e:
        print(f"{STATE_FILE} cannot be read: {e}")
        return 1
    if state is None:
        print("not running")
        return 0
    for p in state.get("processes", []):
        p["running"] = _is_recorded_process(p)
    print(json.dumps(state, indent=2))
    return 0


def _stop_from_state() -> int:
    """Stop a recorded topology: through its `run` if one supervises it, else in the same order as
    Topology.stop, by the pids recorded. A pid is signalled only while it is still the process
    recorded (same boot, same start time): after a reboot or a crash the pid may be anyone's."""
    try:
        state = _read_state()
    except (OSError, ValueError) as e:
        print(f"{STATE_FILE} cannot be read ({e}); stop the topology's processes yourself, then remove it",
              file=sys.stderr)
        return 1
    if state is None:
        starting = _take_lock()
        if starting is None:
            print(f"a topology is starting (the pid in {LOCK_FILE}); stop it once it has started", file=sys.stderr)
            return 1
        starting.close()
        print("no topology is running", file=sys.stderr)
        return 0
    supervisor = state.get("supervisor")
    if _is_recorded_process(supervisor):
        assert supervisor is not None
        print(f"topology: asking the foreground `run` (pid {supervisor['pid']}) to stop", file=sys.stderr)
        try:
            os.kill(int(supervisor["pid"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 600  # it gives each tier up to 60 s
        while _is_recorded_process(supervisor) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _is_recorded_process(supervisor):
            print("topology: the `run` has not stopped within 10 minutes; stopping its processes directly",
                  file=sys.stderr)
    order = ["haproxy", "api", "beat", "worker", "prometheus", "rabbit"]
    unverified = []
    for prefix in order:
        signalled = []
        for p in (p for p in state.get("processes", []) if p["name"].startswith(prefix)):
            if _is_recorded_process(p):
                try:
                    os.kill(int(p["pid"]), p["signal"])
                    signalled.append(p)
                except ProcessLookupError:
                    pass
            elif _unverifiable(p):
                unverified.append(p)
        for p in signalled:
            deadline = time.monotonic() + 60
            while _is_recorded_process(p) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _is_recorded_process(p):
                try:
                    os.kill(int(p["pid"]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for p in unverified:
        print(f"topology: pid {p['pid']} ({p['name']}) was recorded without its start time (an older state "
              "file), so it cannot be told from an unrelated process: not signalled; stop it yourself if it "
              "is the topology's", file=sys.stderr)
    _remove_state(lambda current: current == state)
    print("topology: stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
