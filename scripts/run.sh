#!/usr/bin/env bash
# The whole stack on this host, in the foreground: the API under gunicorn, a Celery worker and
# Celery beat. Ctrl-C (or TERM) stops all three cleanly; if one dies, the others are stopped too.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p var

pids=()
stop() { # exit status: 0 when asked to stop, else the status of the process that died
  trap - INT TERM
  echo "run: stopping..." >&2
  kill -TERM "${pids[@]}" 2>/dev/null
  wait "${pids[@]}" 2>/dev/null
  echo "run: stopped" >&2
  exit "${1:-0}"
}
trap 'stop 0' INT TERM

.venv/bin/gunicorn -c controlplane/gunicorn.conf.py &
pids+=($!)
# WORKER_NICE > 0 puts the worker below the API and the broker in CPU priority on this shared host:
# faster enqueues, but a retry storm then starves the worker (docs/OPERATIONS.md has both numbers).
nice -n "${WORKER_NICE:-0}" .venv/bin/celery -A controlplane worker --loglevel "${LOG_LEVEL:-INFO}" \
  --concurrency "${WORKER_CONCURRENCY:-$(nproc)}" --hostname "worker@%h" &
pids+=($!)
.venv/bin/celery -A controlplane beat --loglevel "${LOG_LEVEL:-INFO}" &
pids+=($!)

wait -n "${pids[@]}"
status=$?
echo "run: a process exited (status $status); stopping the rest" >&2
stop "$(( status == 0 ? 1 : status ))"  # nothing here should exit on its own: a failure either way
