"""One instance of something per process, made on first use and made again in a forked child: the
background threads these objects own (a queue probe, a reply-queue consumer, a credential cache's
poller, a spool's shipper) do not survive a fork, so a gunicorn or Celery child must start its own."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerProcess(Generic[T]):
    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        """This process's instance, made now if it has none."""
        with self._lock:
            if self._value is None or self._pid != os.getpid():
                self._value, self._pid = self._factory(), os.getpid()
            return self._value

    def if_made(self) -> T | None:
        """This process's instance if something already needed it; never makes one."""
        with self._lock:
            return self._value if self._pid == os.getpid() else None

    def reset(self) -> None:
        """Forget the instance: the next call makes a new one (tests that change the settings)."""
        with self._lock:
            self._value = None
