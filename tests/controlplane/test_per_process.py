"""controlplane.per_process: one instance per process, a new one in a forked child."""
from __future__ import annotations

import os

from controlplane.per_process import PerProcess


def test_one_instance_per_process_and_a_new_one_after_a_fork():
    made = PerProcess(object)
    assert made.if_made() is None  # asking does not make one
    first = made()
    assert made() is first and made.if_made() is first
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing made here yet, and what it makes is its own
        fresh = made.if_made() is None and made() is not first and made() is made()
        os.write(write, b"1" if fresh else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert made() is first  # the parent's is untouched
    made.reset()
    assert made.if_made() is None and made() is not first
