# Two commands do everything on a fresh Debian machine: `make run` and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
export DJANGO_SETTINGS_MODULE := controlplane.settings

.PHONY: run test chaos services services-core venv migrate bench clean wipe-local-data topology topology-start topology-stop

venv: .venv/.installed
.venv/.installed: requirements.txt
	scripts/services.sh --python
	# pip is the last thing `venv` installs: without it the .venv is a failed attempt, made again.
	test -x .venv/bin/pip || { rm -rf .venv && python3 -m venv .venv; }
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# PostgreSQL and RabbitMQ, and the deployment tools the tests check (haproxy, promtool, a compose tool).
services:
	scripts/services.sh

# PostgreSQL and RabbitMQ only: what `make run` and `make bench` need.
services-core:
	scripts/services.sh --no-tools

migrate: venv services-core
	$(PY) manage.py migrate --noinput -v 0

# The whole stack in the foreground (API on 127.0.0.1:8000, a worker, beat); Ctrl-C stops it.
run: venv services-core
	scripts/run.sh

# The whole suite, against the real PostgreSQL and the real RabbitMQ.
# Two pytest processes (pytest-xdist), one per core: most of the suite's time is spent waiting on the
# processes it starts (gunicorn, celery, HAProxy, RabbitMQ nodes), so two overlap it. Work stealing: with
# xdist's default split the last long tests ran on one process while the other idled (7.5 min serial,
# 5.2-6.4 min split, 4.5 min stealing). Each process has its own queue, staging area, worker and test
# database (tests/conftest.py).
test: venv services
	$(PY) -m pytest -n 2 --dist worksteal

# The slow chaos suite (never part of `make test`): stops and starts the machine's PostgreSQL and the
# loopback topology's RabbitMQ nodes under load, and holds an overload (docs/RELIABILITY.md).
chaos: venv services
	$(PY) -m pytest -m chaos -s

# The production shape of docker/compose.yml as processes on loopback: a 3-node RabbitMQ cluster,
# 2 API servers behind HAProxy, 2 workers, beat, Prometheus. `topology` runs in the foreground
# (Ctrl-C stops it); `topology-start` / `topology-stop` in the background.
topology: venv services
	$(PY) scripts/topology.py run

topology-start: venv services
	$(PY) scripts/topology.py start

topology-stop:
	$(PY) scripts/topology.py stop

# This service against thumbor and the in-process ceiling, on this machine (docs/BENCHMARKS.md; ~17 min).
# Installs thumbor into bench/.thumbor-venv on first use. The other benchmarks: bench/*.py.
bench: migrate
	$(PY) bench/bench_peers.py

# Caches and what tests and benchmarks leave behind, nothing else. Never var/spool (usage records not
# yet shipped to Postgres: unbilled work), var/archive (archived usage: its rows are deleted from
# Postgres, the files are the only copy), var/topology (a running topology's state, data and spools),
# var/staging (jobs in flight), nor the identity snapshot or beat's schedule (docs/OPERATIONS.md).
clean:
	rm -rf .pytest_cache .hypothesis .schemathesis var/bench-spool-* var/bench-ship-*
	find . \( -path ./.venv -o -path ./bench/.thumbor-venv \) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# Everything under var/ (a development machine's full reset). Refuses while a topology is recorded
# as running or any spool under var/ holds a record (ship it first: `manage.py metering_run ship`, with
# Postgres up; records the table refused, in <spool>/rejected/, and unreadable segments, in <spool>/bad/,
# are never shipped: WIPE_REJECTED=yes once read); keeps var/archive, the only copy of archived usage, unless WIPE_ARCHIVE=yes.
wipe-local-data:
	@if [[ -e var/topology/state.json ]]; then \
	  echo "wipe-local-data: a topology is recorded as running (var/topology/state.json): make topology-stop first" >&2; exit 1; fi
	@unshipped=$$(find var -path '*/spool/*' ! -path '*/rejected/*' ! -path '*/bad/*' -type f -size +0c 2>/dev/null | head -n 5); \
	if [[ -n $$unshipped ]]; then \
	  echo "wipe-local-data: usage records not yet shipped, e.g.:" >&2; echo "$$unshipped" >&2; \
	  echo "ship them first, each spool into its own database; nothing was deleted:" >&2; \
	  echo "  var/spool: .venv/bin/python manage.py metering_run ship" >&2; \
	  echo "  a topology's (var/topology/.../spool): METERING_SPOOL_DIR=<that spool> DATABASE_URL=\$${TOPOLOGY_DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/resizer_topology} .venv/bin/python manage.py metering_run ship" >&2; \
	  exit 1; fi
	@rejected=$$(find var -path '*/spool/*' \( -path '*/rejected/*' -o -path '*/bad/*' \) -type f -size +0c 2>/dev/null | head -n 5); \
	if [[ -n $$rejected && "$(WIPE_REJECTED)" != yes ]]; then \
	  echo "wipe-local-data: usage records set aside (refused by the staging table, or unreadable) wait for an operator, e.g.:" >&2; \
	  echo "$$rejected" >&2; echo "read them (docs/OPERATIONS.md), then WIPE_REJECTED=yes; nothing was deleted" >&2; exit 1; fi
	@if [[ "$(WIPE_ARCHIVE)" == yes ]]; then rm -rf var; \
	else find var -mindepth 1 -maxdepth 1 ! -name archive -exec rm -rf {} + 2>/dev/null; \
	  if [[ -d var/archive ]]; then echo "wipe-local-data: kept var/archive (the only copy of archived usage; WIPE_ARCHIVE=yes removes it)"; fi; fi
	rm -rf .pytest_cache .hypothesis .schemathesis
