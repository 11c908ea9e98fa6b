"""`make run`'s port check (scripts/check_ports.py): one stack per host, refused before anything starts."""
from __future__ import annotations

import socket

from scripts.check_ports import in_use


def test_a_port_held_by_a_listener_is_in_use_and_other_binds_are_left_to_gunicorn():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert in_use(f"127.0.0.1:{port}")
        assert in_use(f":{port}")  # every address: the one held among them
    assert not in_use(f"127.0.0.1:{port}")  # given back
    assert not in_use("unix:/run/resizer.sock") and not in_use("fd://3") and not in_use("")
    assert not in_use("127.0.0.1:not-a-port")  # gunicorn's to refuse
