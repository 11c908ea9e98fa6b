"""`make run`'s first step: one stack per host (it uses the host's `resizer` database and `resize` queue),
so its ports must be free before anything starts or changes. A second `make run` started its worker, which
took jobs from the shared queue whose inputs live in the other checkout's var/, before gunicorn failed to
bind (and migrated the shared database under the running stack first)."""
import errno, os, socket, sys
for name, default in (("API_BIND", "127.0.0.1:8000"), ("WORKER_METRICS_BIND", "127.0.0.1:9808")):
    bind = os.environ.get(name, default)
    if not bind or bind.startswith(("unix:", "fd://")):
        continue  # a socket file or an inherited descriptor: gunicorn says if it cannot use it
    host, _, port = bind.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host.strip("[]") or ("::" if family == socket.AF_INET6 else "0.0.0.0"), int(port)))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            sys.exit(f"run: {bind} ({name}) is in use: another `make run`, or something else, holds it."
                     f" Stop it, or set {name} (one stack per host: they share the database and the queue).")
    except ValueError:
        pass  # not host:port: left to gunicorn
    finally:
        s.close()
