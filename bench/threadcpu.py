"""The API's WSGI application, timed: gunicorn loads this instead (API_WSGI_APP=bench.threadcpu:application)
when bench/cpu_breakdown.py measures where an API process's CPU goes. Each process writes, every second,
the CPU time of each of its threads (from /proc, by Python thread name) and the CPU its request
threads spent inside the Django application to THREADCPU_DIR/cpu-<pid>.json."""
from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable

from controlplane.wsgi import application as _django

_TICK = os.sysconf("SC_CLK_TCK")
_lock = threading.Lock()
_inside = {"seconds": 0.0, "calls": 0}


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
    started = time.thread_time()
    try:
        return _django(environ, start_response)
    finally:
        spent = time.thread_time() - started
        with _lock:
            _inside["seconds"] += spent
            _inside["calls"] += 1


def _thread_cpu(tid: int | str) -> float:
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _group(name: str) -> str:
    return "request threads" if name.startswith("ThreadPoolExecutor") else name


def _report(directory: str) -> None:
    while True:
        time.sleep(1)
        threads: dict[str, float] = {}
        known = set()
        for thread in threading.enumerate():
            try:
                cpu = _thread_cpu(thread.native_id)  # type: ignore[arg-type]
            except (OSError, TypeError):
                continue  # gone, or a forked main thread whose id is the master's
            known.add(thread.native_id)
            threads[_group(thread.name)] = threads.get(_group(thread.name), 0.0) + cpu
        for tid in os.listdir("/proc/self/task"):
            if int(tid) not in known:  # gunicorn's main loop (threading keeps the master's id for it)
                try:
                    threads["main (gunicorn's loop)"] = threads.get("main (gunicorn's loop)", 0.0) + _thread_cpu(tid)
                except OSError:
                    pass
        times = os.times()
        with _lock:
            inside = dict(_inside)
        path = os.path.join(directory, f"cpu-{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"process": times.user + times.system, "threads": threads, "inside_django": inside}, f)
        os.replace(path + ".tmp", path)


if os.environ.get("THREADCPU_DIR"):
    threading.Thread(target=_report, args=(os.environ["THREADCPU_DIR"],), name="threadcpu", daemon=True).start()
