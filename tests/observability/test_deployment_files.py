"""docker/ validated without a container engine: the compose file (docker compose / docker-compose
`config`), its shape (3 RabbitMQ nodes, 2+ API nodes behind HAProxy, 2+ workers, one beat,
Prometheus, Grafana), the Prometheus config and rules (promtool check + promtool's rule unit tests),
HAProxy's config (haproxy -c), and the dashboard's and rules' queries against the metrics the code
exports. The tools are installed by scripts/services.sh (`make test` runs it first)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
PROMETHEUS = DOCKER / "prometheus"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run scripts/services.sh (make test does)"
    return path


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def example_env() -> dict[str, str]:
    import os

    values = dict(line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **values}


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose")]


@pytest.fixture(scope="module")
def compose() -> dict:
    """The compose file as the compose tool resolves it (anchors merged, variables interpolated)."""
    command = [*compose_command(), "-f", str(DOCKER / "compose.yml")]
    run(*command, "config", "-q", env=example_env())
    return yaml.safe_load(run(*command, "config", env=example_env()))


def mounts(service: dict) -> dict[str, str]:
    """{target: source} of a service's volumes, in either rendering (compose v1: "src:dst:ro"; v2: mappings)."""
    found = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            found[v["target"]] = v["source"]
        else:
            source, target = v.split(":")[:2]
            found[target] = source
    return found


def test_compose_needs_its_secrets():
    result = subprocess.run([*compose_command(), "-f", str(DOCKER / "compose.yml"), "config", "-q"],
                            capture_output=True, text=True, env={"PATH": example_env()["PATH"]})
    assert result.returncode != 0 and "docker/.env" in result.stderr + result.stdout


def _services(compose: dict, prefix: str) -> list[str]:
    return sorted(s for s in compose["services"] if re.fullmatch(rf"{prefix}\d+", s))


def test_compose_has_the_production_shape(compose):
    services = compose["services"]
    rabbits, apis, workers = _services(compose, "rabbitmq"), _services(compose, "api"), _services(compose, "worker")
    assert rabbits == ["rabbitmq1", "rabbitmq2", "rabbitmq3"]
    assert len(apis) >= 2 and len(workers) >= 2
    beats = [name for name, s in services.items() if "beat" in (s.get("command") or [])]
    assert beats == ["beat"] and services["beat"].get("deploy", {}).get("replicas") == 1
    assert {"postgres", "haproxy", "prometheus", "grafana", "migrate"} <= set(services)

    plugins = (DOCKER / "rabbitmq" / "enabled_plugins").read_text()
    conf = (DOCKER / "rabbitmq" / "rabbitmq.conf").read_text()
    for name in rabbits:
        s = services[name]
        assert s["image"].startswith("rabbitmq:3.10") and s["hostname"] == name
        assert f"rabbit@{name}" in conf
        assert Path(mounts(s)["/etc/rabbitmq/enabled_plugins"]) == DOCKER / "rabbitmq" / "enabled_plugins"
    assert "rabbitmq_prometheus" in plugins
    for name in apis + workers:
        s = services[name]
        broker = s["environment"]["BROKER_URL"].split(";")
        assert sorted(re.search(r"@(rabbitmq\d)", url).group(1) for url in broker) == rabbits  # failover over all
        assert s["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    for name in apis + workers + ["beat"]:
        s = services[name]
        assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        # Not on each broker node's health: one unhealthy node made `docker compose up -d` fail. The
        # first bootstrap's need (the quorum queue declared once all three are members) is the gate's.
        assert not set(s["depends_on"]) & set(rabbits), (name, s["depends_on"])
        assert s["depends_on"]["rabbitmq-cluster"]["condition"] == "service_completed_successfully", name
    gate = services["rabbitmq-cluster"]
    assert gate["image"].startswith("rabbitmq:3.10") and gate["restart"] == "no"
    script = " ".join(gate["entrypoint"] + gate["command"])
    assert "cluster_status" in script and '-ge 3' in script and all(r in script for r in rabbits)
    assert all(services[r]["depends_on"]["rabbitmq1"]["condition"] == "service_healthy" for r in rabbits[1:])
    # HAProxy's own /readyz checks decide traffic: an unhealthy API node must not keep it from starting.
    assert {a: services["haproxy"]["depends_on"][a]["condition"] for a in apis} == {a: "service_started" for a in apis}
    for name in workers:
        assert services[name]["command"][:4] == ["celery", "-A", "controlplane", "worker"]
        assert not mounts(services[name])["/var/lib/resizer/spool"].startswith("/")  # a named volume, not the container's layer
        # The archive task runs on any worker and deletes rows once their file reads back: the files
        # must be on one shared volume, where METERING_ARCHIVE_URL points.
        archive = services[name]["environment"]["METERING_ARCHIVE_URL"].removeprefix("file://")
        assert mounts(services[name])[archive] == mounts(services[workers[0]])[archive]
        assert not mounts(services[name])[archive].startswith("/")
    archive_volume = mounts(services[workers[0]])[
        services[workers[0]]["environment"]["METERING_ARCHIVE_URL"].removeprefix("file://")]
    for name, s in services.items():
        # `manage.py metering_run archive` can be run by hand in any app container (`exec api1 ...`): the
        # files it writes, the only copy of the rows it deletes, must land on that shared volume.
        if "METERING_ARCHIVE_URL" in (s.get("environment") or {}):
            assert mounts(s).get(s["environment"]["METERING_ARCHIVE_URL"].removeprefix("file://")) == archive_volume, name
    for name in apis:
        # A node recreated while PostgreSQL is away starts from its snapshot: on a volume of its own.
        snapshot_dir = str(Path(services[name]["environment"]["AUTH_SNAPSHOT_PATH"]).parent)
        assert mounts(services[name])[snapshot_dir] == f"identity-{name}", name

    # HAProxy balances exactly the API services, health-checked on /readyz.
    haproxy = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    assert sorted(re.findall(r"^\s+server (\S+) \1:8000$", haproxy, re.M)) == apis
    # HTTP/1.1 with a Host Django allows: HTTP/1.0 without a Host was a 400 (DisallowedHost: gunicorn's
    # bind address 0.0.0.0:8000) in a container, and every API node stayed down.
    assert "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost" in haproxy
    inter_s, fall_s = re.search(r"^\s+default-server check inter (\d+)s fall (\d+) ", haproxy, re.M).groups()
    inter, fall = int(inter_s), int(fall_s)
    for name in apis:
        # Django answers 400 to a Host it does not list: HAProxy's check and the container's own health
        # check send `localhost`; Prometheus sends each node's name (its target, api<N>:8000).
        assert {"localhost", *apis} <= set(services[name]["environment"]["ALLOWED_HOSTS"].split(",")), name
        healthcheck = " ".join(services[name]["healthcheck"]["test"])
        assert "/healthz" in healthcheck and "headers={'Host': 'localhost'}" in healthcheck, healthcheck
        # A deploy drops no request: a stopping node drains (its /readyz failing) longer than HAProxy's
        # checks take to mark it down, then lets requests in flight finish (API_GRACEFUL_TIMEOUT, 25 s),
        # and the container waits for both.
        drain = float(services[name]["environment"]["API_DRAIN_SECONDS"])
        assert drain > inter * fall, (drain, inter, fall)
        assert int(services[name]["stop_grace_period"].rstrip("s")) > drain + 25


def test_allowed_hosts_keeps_the_deployments_own_names_whatever_env_sets():
    """docker/.env names the public host names; compose appends what the health checks and the
    scrapes send, so an operator's ALLOWED_HOSTS cannot lock them out."""
    env = {**example_env(), "ALLOWED_HOSTS": "resizer.example.com"}
    rendered = yaml.safe_load(run(*compose_command(), "-f", str(DOCKER / "compose.yml"), "config", env=env))
    apis = sorted(s for s in rendered["services"] if re.fullmatch(r"api\d+", s))
    for name in apis:
        hosts = rendered["services"][name]["environment"]["ALLOWED_HOSTS"].split(",")
        assert {"resizer.example.com", "localhost", *apis} <= set(hosts), (name, hosts)


def _haproxy_section(config: str, header: str) -> str:
    """The lines of one section (`frontend api`) of haproxy.cfg, up to the next section."""
    lines = config.splitlines()
    start = lines.index(header)
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end])


def test_the_public_frontend_does_not_serve_metrics_or_readiness():
    """/metrics and /readyz are for Prometheus and HAProxy's checks, which reach the nodes directly:
    the public frontend answers them itself, on the decoded path (gunicorn decodes /%6Detrics), before
    any request reaches a node; the loopback topology's copy of the file keeps the rule."""
    from scripts.topology import haproxy_config

    config = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    frontend = _haproxy_section(config, "frontend api")
    rule = re.search(r"^\s+http-request (?:return status 404|deny)\b.* if \{ path,url_dec -m beg ([^}]*)\}$",
                     frontend, re.M)
    assert rule and {"/metrics", "/readyz"} <= set(rule.group(1).split()), frontend
    assert frontend.index(rule.group(0)) < frontend.index("default_backend api")
    # The backend's own checks still ask each node's /readyz directly.
    assert "http-check send meth GET uri /readyz" in _haproxy_section(config, "backend api")
    assert rule.group(0).strip() in haproxy_config(18080, 18404, ["http://127.0.0.1:18001"])


def test_haproxy_config_is_valid():
    assert "Configuration file is valid" in run(tool("haproxy"), "-c", "-f", str(DOCKER / "haproxy" / "haproxy.cfg"))


def test_prometheus_scrapes_every_service(compose):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: sorted(t for c in j["static_configs"] for t in c["targets"]) for j in config["scrape_configs"]}
    assert jobs["api"] == [f"{s}:8000" for s in _services(compose, "api")]
    # Prometheus sends the target's host as Host: each API node must allow its own name.
    for target in jobs["api"]:
        host = target.split(":")[0]
        assert host in compose["services"][host]["environment"]["ALLOWED_HOSTS"].split(","), target
    assert jobs["worker"] == [f"{s}:9808" for s in _services(compose, "worker")]
    assert jobs["rabbitmq"] == jobs["rabbitmq-queues"] == [f"{s}:15692" for s in _services(compose, "rabbitmq")]
    assert jobs["haproxy"] == ["haproxy:8404"]
    assert Path(mounts(compose["services"]["prometheus"])["/etc/prometheus"]) == PROMETHEUS


def test_promtool_checks_the_config_and_the_rules():
    promtool = tool("promtool")
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    for rules in sorted((PROMETHEUS / "rules").glob("*.yml")):
        assert "SUCCESS" in run(promtool, "check", "rules", str(rules))


def test_promtool_rule_unit_tests_pass():
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", "tests/resizer_test.yml", cwd=PROMETHEUS)


# The metrics of HAProxy 2.6's built-in exporter the rules may read (addons/promex), and their labels.
HAPROXY_METRICS = {
    "haproxy_backend_active_servers", "haproxy_backend_backup_servers", "haproxy_backend_status",
    "haproxy_backend_http_responses_total", "haproxy_backend_http_requests_total",
    "haproxy_backend_connection_errors_total", "haproxy_backend_response_errors_total",
    "haproxy_frontend_http_responses_total", "haproxy_frontend_http_requests_total",
    "haproxy_frontend_request_errors_total", "haproxy_frontend_internal_errors_total",
}


def test_edge_alerts_read_what_haproxy_exports():
    """The API's own counters go flat when HAProxy answers by itself (no node ready: 503; 502/504): the
    edge alerts read HAProxy's exporter, by metric names it has, for the proxies haproxy.cfg defines."""
    rules = yaml.safe_load((PROMETHEUS / "rules" / "resizer.yml").read_text())
    by_name = {r.get("alert") or r["record"]: r for g in rules["groups"] for r in g["rules"]}
    config = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    proxies = set(re.findall(r"^(?:frontend|backend|listen) (\S+)$", config, re.M))
    exprs = " ".join(r["expr"] for r in by_name.values())
    assert set(re.findall(r"\bhaproxy_[a-z_]+", exprs)) <= HAPROXY_METRICS
    assert set(re.findall(r'proxy="([^"]+)"', exprs)) <= proxies
    # The exporter is served (the job scrapes :8404/metrics).
    assert "http-request use-service prometheus-exporter if { path /metrics }" in _haproxy_section(config, "frontend metrics")
    assert "haproxy_backend_active_servers" in by_name["LoadBalancerNoApiNode"]["expr"]
    assert "haproxy_frontend_http_responses_total" in by_name["resizer:edge_5xx:ratio_rate1h"]["expr"]
    for alert in ("LoadBalancerNoApiNode", "EdgeErrorsFastBurn"):
        assert by_name[alert]["labels"]["severity"] == "page", alert
    # Every alert's runbook link lands on a heading of docs/OPERATIONS.md.
    anchors = {h.lower() for h in re.findall(r"^### (\S+)$", (ROOT / "docs" / "OPERATIONS.md").read_text(), re.M)}
    for alert in (name for name, r in by_name.items() if "alert" in r):
        page, _, anchor = by_name[alert]["annotations"]["runbook"].partition("#")
        assert page == "docs/OPERATIONS.md" and anchor in anchors, (alert, anchor)


def _exported_metric_names() -> set[str]:
    """Every metric name the code exports (ours), from the modules that define them."""
    source = (ROOT / "controlplane" / "metrics.py").read_text() + (ROOT / "resizer" / "metrics.py").read_text()
    return set(re.findall(r'"(resizer_[a-z_]+)"', source))


def _recorded(rules: dict) -> set[str]:
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def _referenced(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:[a-z]+:)?resizer[_:][a-z0-9_:]*", expr))


def _known(name: str, exported: set[str], recorded: set[str]) -> bool:
    if name in recorded:
        return True
    base = re.sub(r"_(bucket|count|sum|total)$", "", name)
    return base in exported or name in exported


def test_rules_and_dashboard_ask_for_metrics_that_exist(tmp_path):
    rules = yaml.safe_load((PROMETHEUS / "rules" / "resizer.yml").read_text())
    exported, recorded = _exported_metric_names(), _recorded(rules)
    assert {"resizer_resize_request_duration_seconds", "resizer_task_duration_seconds",
            "resizer_metering_spool_oldest_record_age_seconds", "resizer_queue_messages_ready"} <= exported
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = {n for n in _referenced(rule["expr"]) if not _known(n, exported, recorded)}
            assert not unknown, (rule.get("record") or rule.get("alert"), unknown)

    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "resizer.json").read_text())
    datasource = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("p50", "p99", "yield", "throughput", "queue depth", "per-worker throughput", "metering lag"):
        assert wanted in titles, wanted
    exprs = []
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == uid
        for target in panel["targets"]:
            exprs.append(target["expr"])
            unknown = {n for n in _referenced(target["expr"]) if not _known(n, exported, recorded)}
            assert not unknown, (panel["title"], unknown)
    # No query names a queue: RESIZE_QUEUE is renamed for a new delivery limit (docs/OPERATIONS.md), and
    # a panel matching `resize|resize[.]dead` went blank. The queue panel follows a variable of the
    # queue names the API nodes report, all of them by default.
    for e in exprs:
        assert not re.search(r'queue=~?"(?!\$)', e), e
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    queue = variables["queue"]
    assert queue["datasource"]["uid"] == uid and queue["includeAll"] and queue["multi"]
    assert queue["current"]["value"] == ["$__all"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", queue["query"]["query"]).groups()
    assert label == "queue" and _known(metric, exported, recorded), metric
    queue_panel = next(p for p in dashboard["panels"] if p["title"].lower().startswith("queue depth"))
    assert all('queue=~"$queue"' in t["expr"] for t in queue_panel["targets"]), queue_panel["targets"]
    # promtool parses every dashboard query (as recording rules of a throwaway file).
    check = tmp_path / "dashboard-queries.yml"
    check.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    assert "SUCCESS" in run(tool("promtool"), "check", "rules", str(check))
    provider = yaml.safe_load((DOCKER / "grafana" / "provisioning" / "dashboards" / "resizer.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_image_carries_every_package_the_settings_install():
    from django.conf import settings

    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    local_apps = {app for app in settings.INSTALLED_APPS if (ROOT / app).is_dir()} | {"controlplane"}
    for package in local_apps:
        assert f"COPY {package}/ {package}/" in dockerfile and f"!{package}/" in ignore, package
    assert "requirements.txt" in dockerfile and 'CMD ["gunicorn", "-c", "controlplane/gunicorn.conf.py"]' in dockerfile
    assert "USER resizer" in dockerfile


@pytest.mark.django_db(transaction=True)
def test_gunicorn_opens_no_control_socket_another_server_could_take(tmp_path):
    """gunicorn 27 opens a control socket by default, at one path per user: every server on a host
    took the same one, and a server that stopped removed another's."""
    import httpx

    from tests.processes import api_server

    env = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    with api_server(API_WORKERS="1", **env) as base:
        assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200
        assert not (tmp_path / ".gunicorn").exists() and not (tmp_path / "run" / "gunicorn.ctl").exists()


@pytest.mark.django_db(transaction=True)
def test_the_runbooks_readyz_command_prints_a_not_ready_nodes_checks():
    """LoadBalancerNoApiNode's runbook asks each node's /readyz from inside its container, which has no
    curl: the command must send a Host Django allows and print the body of the 503 (urllib raises on
    it, with the checks unread)."""
    from tests.processes import api_server

    runbook = (ROOT / "docs" / "OPERATIONS.md").read_text()
    section = runbook[runbook.index("### LoadBalancerNoApiNode"):runbook.index("### EdgeErrorsFastBurn")]
    command = re.search(r"^    docker compose -f docker/compose\.yml exec api1 python -c \"([^\"]+)\"$", section, re.M)
    assert command, section
    code = command.group(1)
    # The container's own address, with a Host compose always allows (127.0.0.1 is allowed only while
    # docker/.env leaves ALLOWED_HOSTS unset: otherwise a 400).
    assert "'127.0.0.1', 8000" in code and "headers={'Host': 'localhost'}" in code
    # A node that cannot reach its broker: not ready.
    with api_server(API_WORKERS="1", BROKER_URL="amqp://guest:guest@127.0.0.1:1//") as base:
        port = base.rsplit(":", 1)[1]
        out = run(sys.executable, "-c", code.replace("'127.0.0.1', 8000", f"'127.0.0.1', {port}"))
    status, _, body = out.partition(" ")
    assert status == "503", out
    assert json.loads(body)["checks"]["broker"].startswith("unavailable"), out


def test_a_stopping_worker_finishes_its_resize_not_necessarily_a_periodic_run(compose):
    """compose's grace for a worker covers a resize's hard limit; a periodic run's limit is far longer
    and such a run may be killed (harmless: idempotent), as the comment in compose.yml says."""
    import celeryconfig

    for name in _services(compose, "worker"):
        grace = int(compose["services"][name]["stop_grace_period"].rstrip("s"))
        assert celeryconfig.task_time_limit < grace < celeryconfig.PERIODIC_TASK_TIME_LIMIT, (name, grace)
    text = (DOCKER / "compose.yml").read_text()
    comment = text[text.index("x-worker: &worker"):text.index("x-rabbit-env")]
    assert "PERIODIC_TASK_TIME_LIMIT" in comment and "SIGKILL" in comment


def _runbook_command(service: str, program: str) -> list[str]:
    """The argv, from `program` on (up to a redirection), of the runbook's command line
    `docker compose -f docker/compose.yml exec -T <service> <program> ...`."""
    import shlex

    prefix = f"docker compose -f docker/compose.yml exec -T {service} "
    text = (ROOT / "docs" / "OPERATIONS.md").read_text()
    line = next(line.strip() for line in text.splitlines() if line.strip().startswith(prefix + program + " "))
    argv = shlex.split(line[len(prefix):])
    return argv[:next((i for i, a in enumerate(argv) if a in (">", "<")), len(argv))]


def test_the_runbooks_postgres_backup_and_restore_commands_round_trip(tmp_path):
    """The routine operations' pg_dump and pg_restore, with their flags as written, run here against a
    scratch database: a restore puts back what the dump had and takes away what came after."""
    from urllib.parse import urlparse

    from tests.processes import database_url_for_tests

    url = urlparse(database_url_for_tests())
    name = f"{url.path.lstrip('/')}_runbook_backup"
    env = {"PATH": example_env()["PATH"], "PGPASSWORD": url.password or "", "PGHOST": url.hostname or "127.0.0.1",
           "PGPORT": str(url.port or 5432), "PGUSER": url.username or "postgres"}
    dump, restore = _runbook_command("postgres", "pg_dump"), _runbook_command("postgres", "pg_restore")
    assert "-Fc" in dump and {"--clean", "--single-transaction"} <= set(restore)

    def here(argv: list[str]) -> list[str]:  # the container's user (-U) and database (-d) -> the scratch one
        out = []
        for i, a in enumerate(argv):
            if a == "-U" or argv[i - 1] == "-U":
                continue
            out.append(name if argv[i - 1] == "-d" else a)
        return out

    def sql(statement: str, database: str = name) -> str:
        return run("psql", "-X", "-tAc", statement, "-d", database, env=env).strip()

    sql(f"DROP DATABASE IF EXISTS {name}", "postgres")
    sql(f"CREATE DATABASE {name}", "postgres")
    try:
        sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        with open(tmp_path / "backup.dump", "wb") as out:
            subprocess.run(here(dump), stdout=out, env=env, check=True, timeout=60)
        sql("INSERT INTO t VALUES (2)")
        with open(tmp_path / "backup.dump", "rb") as source:
            subprocess.run(here(restore), stdin=source, env=env, check=True, timeout=60)
        assert sql("SELECT array_agg(id) FROM t") == "{1}"
    finally:
        sql(f"DROP DATABASE IF EXISTS {name}", "postgres")


def test_the_runbooks_archive_copy_round_trips_without_temporary_files(tmp_path):
    """The archive volume's copy and restore, as written (GNU tar, as in the image): every file, and
    no temporary file of a write in progress."""
    archive, restored = tmp_path / "archive", tmp_path / "restored"
    day = archive / "usage" / "c1" / "2026" / "11" / "01"
    day.mkdir(parents=True)
    (day / "abc.jsonl.gz").write_bytes(b"records")
    (day / ".tmp-x1y2").write_bytes(b"half-written")
    restored.mkdir()
    here = {"/var/lib/resizer/archive": str(archive)}
    copy = [here.get(a, a) for a in _runbook_command("worker1", "tar czf")]
    back = [{"/var/lib/resizer/archive": str(restored)}.get(a, a) for a in _runbook_command("worker1", "tar xzf")]
    packed = subprocess.run(copy, capture_output=True, check=True, timeout=60).stdout
    subprocess.run(back, input=packed, check=True, timeout=60)
    files = sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file())
    assert files == ["usage/c1/2026/11/01/abc.jsonl.gz"]
