"""Real processes for tests: API servers under gunicorn, and a TCP proxy that can cut the path to a
dependency (to take Postgres away from one process without stopping the server others share)."""
from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import httpx

from scripts.topology import free_port, http_ok, wait_until
from tests.conftest import ROOT, STAGING_DIR


def database_url_for_tests(host: str | None = None, port: int | None = None) -> str:
    """The URL of the database this test run uses (pytest-django's test database)."""
    from django.db import connection

    s = connection.settings_dict
    return f"postgres://{s['USER']}:{s['PASSWORD'] or ''}@{host or s['HOST']}:{port or s['PORT']}/{s['NAME']}"


def log_tail(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


class ServerUrl(str):
    """A server's base URL that also knows the server's process (gunicorn's master)."""
    process: subprocess.Popen


@contextmanager
def api_server(log: IO[bytes] | None = None, **env: str) -> Iterator[ServerUrl]:
    """A gunicorn API server on a free loopback port; yields its base URL (`.process`: gunicorn's
    master). Its stderr (its log lines) goes to `log` when given."""
    port = free_port()
    full_env = {**os.environ, "DATABASE_URL": database_url_for_tests(), "API_BIND": f"127.0.0.1:{port}",
                "API_WORKERS": "2", **env}
    # Not a pipe: one nobody drains fills up and blocks the server's logging.
    errors = log if log is not None else tempfile.TemporaryFile()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c",
                             "controlplane/gunicorn.conf.py"], cwd=ROOT, env=full_env,
                            stdout=subprocess.DEVNULL, stderr=errors)
    base = ServerUrl(f"http://127.0.0.1:{port}")
    base.process = proc
    try:
        try:
            wait_until(f"gunicorn {base}", lambda: http_ok(f"{base}/healthz"), 30, [proc])
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {log_tail(errors)}") from None
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@dataclass
class Worker:
    queue: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def spool(self) -> Path:
        """Its usage spool directory (what its children emit, until their shipper takes it)."""
        return STAGING_DIR.parent / f"{self.queue}-spool"

    def ship_spool(self) -> None:
        """Ship whatever is left in its spool to the test database, from this process; once the worker
        has exited (its locks are gone), that is every record it emitted. Asserts the spool is empty."""
        from metering.services import usage_ship
        from metering.spool import Shipper

        assert self.proc.poll() is not None, "stop the worker first: a live one may still emit or hold a segment"
        usage_ship(directory=self.spool)
        assert Shipper(self.spool, batch_records=1).pending() == 0, list(self.spool.iterdir())

    def children(self) -> list[int]:
        """The pool's child processes (the ones that run tasks)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, needle: str) -> int:
        return self.log_text().count(needle)


@contextmanager
def own_worker(name: str, *, concurrency: int = 1, **env: str) -> Iterator[Worker]:
    """A Celery worker of a test's own: its quorum queue `test.<name>.<id>` (and dead-letter queue,
    deleted afterwards), its own spool, the test database; `env` overrides its settings."""
    queue = f"test.{name}.{uuid.uuid4().hex[:8]}"
    log_path = STAGING_DIR.parent / f"{queue}.log"
    full_env = {**os.environ, "RESIZE_QUEUE": queue, "DATABASE_URL": database_url_for_tests(),
                "METERING_SPOOL_DIR": str(STAGING_DIR.parent / f"{queue}-spool"), "METERING_FLUSH_SECONDS": "0.2",
                "WORKER_METRICS_BIND": "", **env}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "controlplane", "worker", "--concurrency", str(concurrency),
                                 "--loglevel", "INFO", "--without-mingle", "--without-gossip",
                                 "--hostname", f"{queue}@%h"], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while b" ready." not in log_path.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.1)
            yield Worker(queue, proc, log_path)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            delete_queues(queue)


def delete_queues(queue: str) -> None:
    """Everything a worker or API server with RESIZE_QUEUE=`queue` declares (celeryconfig): the resize,
    dead-letter and beat queues, and the resize and dead-letter exchanges."""
    from kombu import Exchange, Queue

    from controlplane.celery import app

    with app.connection_for_write() as connection:
        for name in (queue, f"{queue}.dead", f"{queue}.periodic"):
            try:
                Queue(name).bind(connection.channel()).delete()
            except Exception:
                pass
        for name in (queue, f"{queue}.dlx"):
            try:
                Exchange(name).bind(connection.channel()).delete()
            except Exception:
                pass


def stream_past_limit(base: str, key: str) -> int:
    """Offer 64 MB as a chunked body to a server whose limit is 2 MB; returns the bytes the client
    managed to send before the server refused (413, or the connection cut: both are refusals)."""
    sent = 0

    def endless() -> Iterator[bytes]:
        nonlocal sent
        chunk = b"\xff" * 65536
        while sent < 64 * 1024 * 1024:
            sent += len(chunk)
            yield chunk

    with httpx.Client(base_url=base, timeout=30) as http:
        try:
            response = http.post("/v1/resize?width=10", content=endless(), headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass
    return sent


def read_answer(s: socket.socket) -> bytes:
    """One HTTP answer from a raw socket (headers and a Content-Length body, which may come in several
    reads), or what came before the connection closed or went quiet past the socket's timeout."""
    reply = b""
    try:
        while chunk := s.recv(65536):
            reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), None)
            if length is not None and len(body) >= length:
                break
    except socket.timeout:
        pass
    return reply


def wait_authenticated(base: str, key: str, timeout: float = 15.0) -> None:
    """Until every process of the server knows the key (the data plane follows the feed each second).
    Each probe on a new connection: on one kept alive, every probe reached the same gunicorn process,
    and another process that had not seen the key yet answered the test's first request 401."""
    deadline, streak = time.monotonic() + timeout, 0
    with httpx.Client(base_url=base, timeout=10,
                      headers={"Authorization": f"Bearer {key}", "Connection": "close"}) as http:
        while streak < 10:
            streak = streak + 1 if http.get("/v1/jobs/" + "0" * 32).status_code != 401 else 0
            if time.monotonic() > deadline:
                raise AssertionError(f"{base} did not accept the key within {timeout} s")
            time.sleep(0.05)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `cut()` closes every connection and refuses new ones
    (the dependency is gone, as far as the clients can tell); `restore()` brings it back."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = False
        self.restore()
        threading.Thread(target=self._pump, daemon=True).start()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                # shutdown() first: close() alone leaves a thread blocked in accept() on the socket,
                # which then goes on taking (and forwarding) new connections.
                try:
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for a, b in self._pairs:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
            self._pairs.clear()

    def close(self) -> None:
        self._stop = True
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))

    def _pump(self) -> None:
        while not self._stop:
            with self._lock:
                pairs = list(self._pairs)
            if not pairs:
                time.sleep(0.01)
                continue
            selector = selectors.DefaultSelector()
            for a, b in pairs:
                try:
                    selector.register(a, selectors.EVENT_READ, b)
                    selector.register(b, selectors.EVENT_READ, a)
                except (ValueError, KeyError, OSError):
                    pass
            for key, _ in selector.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if data:
                        key.data.sendall(data)
                        continue
                except OSError:
                    pass
                self._drop(key.fileobj)  # type: ignore[arg-type]
            selector.close()

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            for pair in list(self._pairs):
                if sock in pair:
                    self._pairs.remove(pair)
                    for s in pair:
                        s.close()
