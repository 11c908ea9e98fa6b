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
        assert all(s["depends_on"][r]["condition"] == "service_healthy" for r in rabbits)
        assert s["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert s["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    for name in workers:
        assert services[name]["command"][:4] == ["celery", "-A", "controlplane", "worker"]
        assert not mounts(services[name])["/var/lib/resizer/spool"].startswith("/")  # a named volume, not the container's layer
        # The archive task runs on any worker and deletes rows once their file reads back: the files
        # must be on one shared volume, where METERING_ARCHIVE_URL points.
        archive = services[name]["environment"]["METERING_ARCHIVE_URL"].removeprefix("file://")
        assert mounts(services[name])[archive] == mounts(services[workers[0]])[archive]
        assert not mounts(services[name])[archive].startswith("/")

    # HAProxy balances exactly the API services, health-checked on /readyz.
    haproxy = (DOCKER / "haproxy" / "haproxy.cfg").read_text()
    assert sorted(re.findall(r"^\s+server (\S+) \1:8000$", haproxy, re.M)) == apis
    # HTTP/1.1 with a Host Django allows: HTTP/1.0 without a Host was a 400 (DisallowedHost: gunicorn's
    # bind address 0.0.0.0:8000) in a container, and every API node stayed down.
    assert "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost" in haproxy
    for name in apis:
        assert "localhost" in services[name]["environment"]["ALLOWED_HOSTS"].split(",")
        # A deploy lets requests in flight finish: the container waits longer than gunicorn does.
        assert int(services[name]["stop_grace_period"].rstrip("s")) > 25


def test_haproxy_config_is_valid():
    assert "Configuration file is valid" in run(tool("haproxy"), "-c", "-f", str(DOCKER / "haproxy" / "haproxy.cfg"))


def test_prometheus_scrapes_every_service(compose):
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {j["job_name"]: sorted(t for c in j["static_configs"] for t in c["targets"]) for j in config["scrape_configs"]}
    assert jobs["api"] == [f"{s}:8000" for s in _services(compose, "api")]
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
