"""The resize workers' prefork pool: Celery's, plus what only its main process sees, a pool child's death.

A child killed mid-job (the hard time limit, the OOM killer, a segfault) never finishes its own
measurements (resizer.metrics.TaskMeter) nor runs worker_process_shutdown (Celery dispatches that
signal in the child, as it exits). The main process reaps it (billiard's _join_exited_workers, on
SIGCHLD and every 5 s); here, right after, it counts the death by reason and marks the pid dead in the
metrics directory (docs/adr/0005-observability.md). Selected by `worker_pool` in celeryconfig.py.
"""
from __future__ import annotations

import logging
from typing import Any

from celery.concurrency.asynpool import AsynPool
from celery.concurrency.prefork import TaskPool

log = logging.getLogger(__name__)


class MeteredAsynPool(AsynPool):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Pids the pool killed at a job's hard time limit (until reaped).
        self._timed_out_pids: set[int] = set()
        super().__init__(*args, **kwargs)
        # AsynPool takes on_hard_timeout from its timeout handler as an instance attribute: wrap that.
        on_hard_timeout = self.on_hard_timeout

        def on_hard_timeout_noted(job: Any) -> None:
            pid = getattr(job, "_worker_pid", None)
            if pid and not job.ready():
                self._timed_out_pids.add(pid)
            on_hard_timeout(job)

        self.on_hard_timeout = on_hard_timeout_noted

    def _join_exited_workers(self, shutdown: bool = False) -> Any:
        before = list(self._pool)
        try:
            return super()._join_exited_workers(shutdown=shutdown)
        finally:
            still = {id(proc) for proc in self._pool}
            for proc in before:
                if id(proc) not in still:
                    self._child_reaped(proc)

    def _child_reaped(self, proc: Any) -> None:
        try:
            from resizer.metrics import child_exited

            pid = proc.pid
            child_exited(pid, proc.exitcode, timed_out=pid in self._timed_out_pids,
                         controlled=bool(getattr(proc, "_controlled_termination", False)))
            self._timed_out_pids.discard(pid)
        except Exception as e:  # never let metrics break the pool's supervision
            log.warning("pool child exit not recorded: %s", e)


class MeteredTaskPool(TaskPool):
    Pool = MeteredAsynPool
