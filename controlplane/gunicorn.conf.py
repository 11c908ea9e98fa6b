"""gunicorn settings for the API tier (`gunicorn -c controlplane/gunicorn.conf.py`), from the environment."""
import multiprocessing
import os

from gunicorn import glogging

bind = os.environ.get("API_BIND", "127.0.0.1:8000")
# A request's database statements are bounded in the API (controlplane/settings.py), not in workers,
# beat or manage.py: set here, before any worker loads the settings; the environment can override.
os.environ.setdefault("DATABASE_STATEMENT_TIMEOUT_SECONDS", "15")
os.environ.setdefault("DATABASE_LOCK_TIMEOUT_SECONDS", "5")
workers = int(os.environ.get("API_WORKERS", multiprocessing.cpu_count()))
# Threads, because a synchronous resize request mostly waits on its job: waiting costs no CPU.
worker_class = "gthread"
threads = int(os.environ.get("API_THREADS", 16))
# With the gthread worker this restarts a process whose main loop stopped heartbeating; it does not
# cut a slow request (the API's own read and write bounds and HAProxy's `timeout server` do).
timeout = int(os.environ.get("API_TIMEOUT", 30))
# On SIGTERM (a deploy), how long requests in flight may still take: a synchronous resize waits up to
# SYNC_WAIT_SECONDS (10) for its job, then answers. Cut short, its client never learns the job's id,
# though the job runs and is billed. The container's stop grace period must be longer (docker/compose.yml).
graceful_timeout = int(os.environ.get("API_GRACEFUL_TIMEOUT", 25))
# On SIGTERM, how long /readyz answers 503 `draining` (everything else served as before) before the
# graceful stop begins: behind a load balancer, longer than its checks take to mark the node down
# (HAProxy: inter 2 s x fall 2). 0 (the default, `make run`): the stop begins at once. A second SIGTERM
# ends the wait (one sent after the first was handled: the master handles signals at least once a second;
# two sent together arrive as one). The container's stop grace period must cover both waits (docker/compose.yml).
drain_seconds = float(os.environ.get("API_DRAIN_SECONDS", 0))
keepalive = 5
# gunicorn's control interface (gunicornc) is not used: on by default, every gunicorn on a host took the
# same socket path ($HOME/.gunicorn/gunicorn.ctl), and a server that stopped removed another's.
control_socket_disable = True
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# Off by default: the API logs each resize itself (logger controlplane.access, with its job and request
# ids). gunicorn would turn its own access log on whenever a logging config is given (JSON below), so
# its logger class is told explicitly.
ACCESS_LOG = os.environ.get("API_ACCESS_LOG", "false").lower() == "true"
accesslog = "-" if ACCESS_LOG else None
if os.environ.get("LOG_FORMAT", "json") == "json":  # gunicorn's own lines as JSON too (controlplane/logs.py)
    logconfig_dict = {
        "formatters": {"json": {"()": "controlplane.logs.json_formatter"}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {name: {"level": "INFO", "handlers": ["console"], "propagate": False, "qualname": name}
                    for name in ("gunicorn.error", "gunicorn.access")},
    }
# Another WSGI callable only for diagnostics (bench/cpu_breakdown.py wraps the API to time it).
wsgi_app = os.environ.get("API_WSGI_APP", "controlplane.wsgi:application")


class Logger(glogging.Logger):
    """gunicorn's logger, with its access log on only when API_ACCESS_LOG=true (each line costs the
    request thread ~0.1 ms of CPU building and formatting it)."""

    def _compute_access_log_enabled(self) -> bool:
        return ACCESS_LOG


logger_class = Logger


# --- metrics: one /metrics for all workers (docs/adr/0005-observability.md) ----------------------
def on_starting(server):  # type: ignore[no-untyped-def]
    """A fresh multiprocess directory for this start, before any worker imports prometheus_client;
    the draining flag made here, in the master, so that every worker forked from it shares it."""
    from controlplane import metrics_dir

    metrics_dir.prepare("api")
    _drain_on_term(server)


def _drain_on_term(server) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM starts draining (controlplane/draining.py) for `drain_seconds`, then gunicorn's own
    graceful stop; the master's loop, which wakes at least once a second, ends the wait. A second
    SIGTERM stops at once; SIGINT and SIGQUIT (the quick stop) are unchanged."""
    import time

    from controlplane import draining

    if drain_seconds <= 0:
        return
    stop_term = server.handle_term
    murder_workers = server.murder_workers
    deadline: list[float] = []

    def handle_term() -> None:
        if deadline:
            stop_term()
        deadline.append(time.monotonic() + drain_seconds)
        draining.start()
        server.log.info("draining: /readyz answers 503 for %.0f s, then the graceful stop", drain_seconds)

    def murder_workers_or_stop() -> None:
        if deadline and time.monotonic() >= deadline[0]:
            stop_term()
        murder_workers()

    server.handle_term = handle_term
    server.murder_workers = murder_workers_or_stop


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    from controlplane.metrics import process_gauges_start

    process_gauges_start()
    _graceful_closes_off_the_main_loop()
    _own_errors_as_problems()
    _continue_on_first_read()


def _continue_on_first_read() -> None:
    """gunicorn answers `Expect: 100-continue` as it makes the WSGI environ, before the application
    runs; here the `100 Continue` waits for the application's first read of the body
    (controlplane.parsing.ContinueOnRead). HTTP/1 only: gunicorn's HTTP/2 streams already send their
    100 at the body's first read."""
    from gunicorn.http import wsgi

    from controlplane.parsing import ContinueOnRead

    if getattr(wsgi.create, "continue_on_read", False):
        return
    create = wsgi.create

    def create_deferring_continue(req, sock, *args, **kwargs):  # type: ignore[no-untyped-def]
        expected = bool(getattr(req, "_expected_100_continue", False)) and kwargs.get("response_class") is None
        if expected:
            req._expected_100_continue = False
        resp, environ = create(req, sock, *args, **kwargs)
        if expected:
            environ["wsgi.input"] = ContinueOnRead(environ["wsgi.input"], sock)
        return resp, environ

    create_deferring_continue.continue_on_read = True  # type: ignore[attr-defined]
    wsgi.create = create_deferring_continue


# gunicorn's own refusals (a request it cannot parse, before Django sees it), by status: the API's codes.
EDGE_ERROR_CODES = {400: "malformed_request", 403: "forbidden", 414: "uri_too_long", 417: "expectation_failed",
                    431: "headers_too_large", 500: "internal_error", 501: "not_implemented"}


def _own_errors_as_problems() -> None:
    """gunicorn answers a request it cannot parse (a request line over 8190 bytes, 100 headers, a
    malformed chunk size, ...) itself, with an HTML page: the one answer of the API that was not
    problem+json with a code. Its writer is replaced with one that is; gunicorn still picks the status
    and the sentence (what was wrong, as the client sent it, cut to 200 characters)."""
    import json
    from http import HTTPStatus

    from gunicorn import util

    from controlplane.errors import PROBLEM_TYPE_BASE  # the application is loaded by now

    if getattr(util.write_error, "problem_json", False):
        return

    def write_problem(sock, status_int, reason, mesg):  # type: ignore[no-untyped-def]
        code = EDGE_ERROR_CODES.get(status_int, "malformed_request" if 400 <= status_int < 500 else "internal_error")
        # The status's own phrase: gunicorn passes "Bad Request" with its 501 (the answer read "501 Bad Request").
        try:
            reason = HTTPStatus(status_int).phrase
        except ValueError:
            pass
        detail = f"{mesg[:200].rstrip('.')}." if mesg else f"{reason}."
        body = json.dumps({"type": PROBLEM_TYPE_BASE + code, "title": reason,
                           "status": status_int, "detail": detail, "code": code}).encode()
        head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
                f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n\r\n")
        util.write_nonblock(sock, head.encode("latin-1") + body)

    write_problem.problem_json = True  # type: ignore[attr-defined]
    util.write_error = write_problem


def _graceful_closes_off_the_main_loop() -> None:
    """gunicorn 27's gthread worker closes a finished connection "gracefully" on its main loop: it
    shuts the writing side, then waits up to 2 s for the client to close its own. A client that never
    does (it sent `Connection: close`, or stopped reading) stalls the loop that accepts and dispatches
    every other request: 10 such clients made a /healthz wait 11.5 s, 20 more than a minute. Those
    closes run on 4 daemon threads of their own instead, at most CLOSE_BACKLOG waiting; past that a
    connection is closed at once (no linger), so lingering sockets stay bounded and a stopping worker
    does not wait for them. Behind HAProxy, which closes its side at once, this seldom matters."""
    import queue
    import threading

    from gunicorn.workers import gthread

    close = gthread.TConn.close
    if getattr(close, "off_the_main_loop", False):
        return
    backlog: queue.Queue = queue.Queue(maxsize=CLOSE_BACKLOG)

    def closer() -> None:
        while True:
            conn = backlog.get()
            try:
                close(conn, True)
            except Exception:  # noqa: BLE001 - a socket already gone
                pass

    for i in range(4):
        threading.Thread(target=closer, name=f"graceful-close-{i}", daemon=True).start()

    def close_off_the_main_loop(self, graceful=False):  # type: ignore[no-untyped-def]
        if graceful:
            try:
                backlog.put_nowait(self)
                return
            except queue.Full:
                pass
        close(self)

    close_off_the_main_loop.off_the_main_loop = True  # type: ignore[attr-defined]
    gthread.TConn.close = close_off_the_main_loop


CLOSE_BACKLOG = 64


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    """In the worker, after it stopped serving (a deploy, a max-requests restart): its last second of
    quota counts reach Postgres and its heartbeat goes, so the other processes' rate shares grow now."""
    from identity.dataplane import credential_cache

    cache = credential_cache.if_made()
    if cache is not None:
        cache.close()


def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's counters stay summed; its live gauges (the snapshot time) go."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):  # type: ignore[no-untyped-def]
    from controlplane import metrics_dir

    metrics_dir.cleanup()
