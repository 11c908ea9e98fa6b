"""gunicorn settings for the API tier (`gunicorn -c controlplane/gunicorn.conf.py`), from the environment."""
import multiprocessing
import os

bind = os.environ.get("API_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("API_WORKERS", multiprocessing.cpu_count()))
# Threads, because a synchronous resize request mostly waits on its job: waiting costs no CPU.
worker_class = "gthread"
threads = int(os.environ.get("API_THREADS", 16))
# Above SYNC_WAIT_SECONDS, so a waiting request is answered (202) before gunicorn gives up on it.
timeout = int(os.environ.get("API_TIMEOUT", 30))
graceful_timeout = 10
keepalive = 5
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-" if os.environ.get("API_ACCESS_LOG", "false").lower() == "true" else None
wsgi_app = "controlplane.wsgi:application"
