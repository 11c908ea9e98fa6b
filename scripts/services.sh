#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ are installed and running on this host, and that our database
# exists. Installs them with apt-get when missing, starts them when stopped, otherwise uses the
# running ones. Idempotent: safe to run before every `make run` and `make test`.
#   scripts/services.sh              PostgreSQL, RabbitMQ and the deployment tools (make test)
#   scripts/services.sh --no-tools   PostgreSQL and RabbitMQ only (make run, make bench)
#   scripts/services.sh --python     only a python3 that can make virtualenvs (make venv)
set -euo pipefail
# rabbitmq-server, haproxy and pg_ctlcluster's helpers live in /usr/sbin, which Debian leaves out of
# an ordinary user's PATH: without it they look missing and the script would try to install them.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

apt_updated=""

say() { echo "services: $*" >&2; }

apt_install() {
  if [[ $(id -u) -ne 0 ]]; then
    say "need to install $* but not root; install it, or run as root"; exit 1
  fi
  [[ -n $apt_updated ]] || { apt-get update -qq; apt_updated=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port seconds what
  for _ in $(seq 1 "$(($3 * 5))"); do port_open "$1" "$2" && return 0; sleep 0.2; done
  say "$4 did not open $1:$2 within $3 s"; return 1
}

ensure_postgres() {
  # The database the project uses (settings.py's default unless DATABASE_URL says otherwise); its
  # server is administered as the same user, in its `postgres` database. (Parsed here, not at the top:
  # `--python` runs where there may be no python3 yet.)
  local PGHOST PGPORT DB_NAME ADMIN_URL
  read -r PGHOST PGPORT DB_NAME ADMIN_URL < <(python3 - "${DATABASE_URL:-postgres://postgres:postgres@127.0.0.1:5432/resizer}" <<'PY'
import sys
from urllib.parse import urlsplit
url = urlsplit(sys.argv[1])
print(url.hostname or "127.0.0.1", url.port or 5432, url.path.lstrip("/") or "resizer",
      url._replace(path="/postgres").geturl())
PY
)
  local installed_now=""
  if ! command -v pg_ctlcluster >/dev/null; then
    say "installing PostgreSQL"; apt_install postgresql; installed_now=1
  fi
  if ! port_open "$PGHOST" "$PGPORT"; then
    # The cluster that listens on DATABASE_URL's port (several versions may be installed side by side,
    # each on its own port); none configured for it: the newest version's `main`, as before.
    local version cluster
    read -r version cluster < <(pg_lsclusters --no-header 2>/dev/null | awk -v port="$PGPORT" '$3 == port { print $1, $2; exit }') || true
    if [[ -z ${version:-} || -z ${cluster:-} ]]; then
      version=$(ls /etc/postgresql | sort -V | tail -n 1); cluster=main
    fi
    say "starting PostgreSQL $version/$cluster"
    # Exit status 2 is "already running" (it may be starting, its port not open yet): wait for the port.
    local rc=0
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start || rc=$?
    if [[ $rc -ne 0 ]]; then
      if [[ $rc -eq 2 ]] || pg_lsclusters --no-header "$version" "$cluster" 2>/dev/null \
           | awk '$4 ~ /^online/ { up = 1 } END { exit !up }'; then
        say "PostgreSQL $version/$cluster is already running; waiting for its port"
      else
        say "pg_ctlcluster $version $cluster start failed (exit status $rc)"; exit "$rc"
      fi
    fi
    wait_port "$PGHOST" "$PGPORT" 30 PostgreSQL
  fi
  if ! psql "$ADMIN_URL" -tAc "SELECT 1" >/dev/null 2>&1; then
    # A fresh Debian cluster asks TCP clients for a password its postgres user does not have (also
    # after a first run cut off between the install and this step): give it the default URL's one.
    if [[ -z $installed_now && ( $(id -u) -ne 0 || $ADMIN_URL != postgres://postgres:postgres@127.0.0.1:* ) ]]; then
      say "cannot log in to PostgreSQL as $ADMIN_URL; set DATABASE_URL to a user that can"; exit 1
    fi
    say "setting the password of PostgreSQL's postgres user (DATABASE_URL's default)"
    su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'postgres'\""
  fi
  if ! psql "$ADMIN_URL" -tAc "SELECT 1 FROM pg_database WHERE datname='$DB_NAME'" | grep -q 1; then
    say "creating database $DB_NAME"
    psql "$ADMIN_URL" -qc "CREATE DATABASE \"$DB_NAME\""
  fi
}

ensure_rabbitmq() {
  if ! command -v rabbitmq-server >/dev/null; then
    say "installing RabbitMQ"; apt_install rabbitmq-server
  fi
  if ! port_open 127.0.0.1 5672; then
    say "starting RabbitMQ"
    rabbitmq-server -detached
    wait_port 127.0.0.1 5672 90 RabbitMQ
  fi
}

# Tools of the deployment and its checks (docker/, scripts/topology.py, tests/observability/):
# haproxy (the load balancer), promtool and prometheus, and a compose tool to validate the compose
# file without an engine. Installed, never started as services, now or at boot.
POLICY_RC=/usr/sbin/policy-rc.d
made_policy=""
remove_policy() { [[ -z $made_policy ]] || rm -f "$POLICY_RC"; made_policy=""; }

# Debian's packages enable their daemon at boot (policy-rc.d only stops the start at install time).
# systemd's units are disabled whether or not systemd runs here (systemctl, else deb-systemd-helper
# edit the same links); a sysvinit script's links too. Nothing of this present: nothing to do.
disable_at_boot() {
  local unit
  for unit in "$@"; do
    if ! { command -v systemctl >/dev/null && systemctl disable --quiet "$unit.service" >/dev/null 2>&1; }; then
      if command -v deb-systemd-helper >/dev/null; then
        deb-systemd-helper disable "$unit.service" >/dev/null 2>&1 || true
      fi
    fi
    if [[ -x /etc/init.d/$unit ]] && command -v update-rc.d >/dev/null; then
      update-rc.d "$unit" disable >/dev/null 2>&1 || true
    fi
  done
}

ensure_tools() {
  local missing=() daemons=()
  command -v haproxy >/dev/null || { missing+=(haproxy); daemons+=(haproxy); }
  command -v promtool >/dev/null || { missing+=(prometheus); daemons+=(prometheus); }
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
    missing+=(docker-compose)
  fi
  [[ ${#missing[@]} -eq 0 ]] && return 0
  say "installing ${missing[*]}"
  if [[ $(id -u) -eq 0 && ! -e $POLICY_RC ]]; then
    # Debian starts a package's daemon on install; we only want the binaries. Removed however this
    # script ends (an error, Ctrl-C, a hangup): left behind, it would stop every later install on
    # this host from starting its service.
    trap remove_policy EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    made_policy=1
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"; chmod +x "$POLICY_RC"
  fi
  apt_install --no-install-recommends "${missing[@]}"
  remove_policy
  trap - EXIT INT TERM HUP
  [[ ${#daemons[@]} -eq 0 ]] || disable_at_boot "${daemons[@]}"
  return 0
}

# Debian's python3 makes no virtualenv without python3-venv (no ensurepip).
ensure_python() {
  python3 -c 'import ensurepip, venv' 2>/dev/null && return 0
  say "installing python3 and python3-venv"; apt_install python3 python3-venv
}

case "${1:-}" in
  --python) ensure_python; exit 0 ;;
  --no-tools) ensure_postgres; ensure_rabbitmq ;;
  "") ensure_postgres; ensure_rabbitmq; ensure_tools ;;
  *) say "unknown option $1"; exit 2 ;;
esac
say "PostgreSQL (DATABASE_URL's server and database) and RabbitMQ on 127.0.0.1:5672 are up"
