#!/usr/bin/env bash
# The whole stack on this host, in the foreground: the API under gunicorn, a Celery worker and
# Celery beat. Ctrl-C (or TERM, or the terminal closing: HUP) stops all three cleanly; if one dies,
# the others are stopped too. A second Ctrl-C while they stop hurries them (SIGQUIT: gunicorn's
# quick shutdown, the worker's cold one); a third kills them.
#
# Each child runs in a session of its own (setsid), so the terminal's signals reach only this
# script, which stops them in order: a Ctrl-C sent straight to gunicorn would be its quick shutdown
# (requests in flight cut), and a hangup would reach it as HUP, which gunicorn takes as "reload",
# leaving it running without us.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p var

.venv/bin/python scripts/check_ports.py || exit 1  # one stack per host: before anything starts or changes
.venv/bin/python manage.py migrate --noinput -v 0 || exit 1
if [[ $(trap -p INT) == "trap -- '' SIGINT" ]]; then
  # Started in the background by a non-interactive shell: SIGINT is ignored and cannot be trapped.
  echo "run: SIGINT is ignored here (started in the background): stop it with TERM (kill <pid>)" >&2
fi
scripts/demo_key.sh || exit 1

pids=()        # every child: the API, the worker, beat
quick_pids=()  # the ones with a quicker stop on SIGQUIT (gunicorn, the Celery worker); beat stops at once anyway
hurried=0
stop() { # exit status: 0 when asked to stop, else the status of the process that died
  trap hurry INT TERM HUP
  echo "run: stopping..." >&2
  kill -TERM "${pids[@]}" 2>/dev/null
  # A trapped signal interrupts `wait`: wait again until no child is left running.
  while [[ -n $(jobs -pr) ]]; do wait; done
  echo "run: stopped" >&2
  exit "${1:-0}"
}
hurry() {
  hurried=$((hurried + 1))
  if ((hurried == 1)); then
    echo "run: hurrying them (SIGQUIT); once more kills them" >&2
    kill -QUIT "${quick_pids[@]}" 2>/dev/null
  else
    echo "run: killing them" >&2
    kill -KILL "${pids[@]}" 2>/dev/null
  fi
}
trap 'stop 0' INT TERM HUP

# `setsid CMD &` without job control (this script has none): the child is not a process-group
# leader, so setsid makes the new session in that same process and execs CMD: $! is CMD's pid.
setsid .venv/bin/gunicorn -c controlplane/gunicorn.conf.py &
pids+=($!) quick_pids+=($!)
# WORKER_NICE > 0 puts the worker below the API and the broker in CPU priority on this shared host:
# faster enqueues, but a retry storm then starves the worker (docs/OPERATIONS.md has both numbers).
setsid nice -n "${WORKER_NICE:-0}" .venv/bin/celery -A controlplane worker --loglevel "${LOG_LEVEL:-INFO}" \
  --concurrency "${WORKER_CONCURRENCY:-$(nproc)}" --hostname "worker@%h" &
pids+=($!) quick_pids+=($!)
setsid .venv/bin/celery -A controlplane beat --loglevel "${LOG_LEVEL:-INFO}" &
pids+=($!)

wait -n "${pids[@]}"
status=$?
echo "run: a process exited (status $status); stopping the rest" >&2
stop "$(( status == 0 ? 1 : status ))"  # nothing here should exit on its own: a failure either way
