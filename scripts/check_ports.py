"""`make run`'s first step: one stack per host (it uses the host's `resizer` database and `resize` queue),
so its ports must be free before anything starts or changes. A second `make run` started its worker, which
took jobs from the shared queue whose inputs live in the other checkout's var/, before gunicorn failed to
bind (and migrated the shared database under the running stack first)."""
import errno
import os
import socket
import sys

BINDS = (("API_BIND", "127.0.0.1:8000"), ("WORKER_METRICS_BIND", "127.0.0.1:9808"))


def in_use(bind: str) -> bool:
    """Whether host:port is taken now. Other binds (unix:, fd://) and other failures are gunicorn's to report."""
    if not bind or bind.startswith(("unix:", "fd://")):
        return False
    host, _, port = bind.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") or ("::" if family == socket.AF_INET6 else "0.0.0.0"), int(port)))
        except ValueError:
            return False
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


if __name__ == "__main__":
    for name, default in BINDS:
        bind = os.environ.get(name, default)
        if in_use(bind):
            sys.exit(f"run: {bind} ({name}) is in use: another `make run`, or something else, holds it."
                     f" Stop it, or set {name} (one stack per host: they share the database and the queue).")
