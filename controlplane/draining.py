"""A stopping API node's "draining" state, shared by gunicorn's master and its worker processes.

On SIGTERM with API_DRAIN_SECONDS > 0 (controlplane/gunicorn.conf.py), the master first sets this flag
and keeps serving: every process's `/readyz` answers 503 `draining`, so the load balancer's checks take
the node out of rotation while it still answers everything sent to it. Only then does gunicorn's
graceful stop begin. Stopped at once instead, a node closed its idle keep-alive connections under
requests HAProxy had just sent on them: 502s to clients on every deploy.

The flag is one byte of anonymous shared memory, made when this module is first imported. gunicorn's
config imports it in the master, before any worker is forked, so every worker shares the master's
byte; anywhere else (tests, `runserver`, the Celery worker) it is a private byte that stays 0."""
from __future__ import annotations

import mmap

_flag = mmap.mmap(-1, 1)


def start() -> None:
    _flag[0] = 1


def active() -> bool:
    return _flag[0] == 1
