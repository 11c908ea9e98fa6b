"""bench/ab.py's summary: per load step, each side's mean over its runs; open-loop steps matched by kind."""
from __future__ import annotations

from bench.ab import summary


def step(load: str, throughput: float, api: float, staging: float | None = None, target: str = "service") -> dict:
    return {"target": target, "size": 256, "images": "256k", "load": load, "throughput": throughput,
            "cpu_ms_per_request": {"api": api, "worker": 10.0, "broker": 2.0},
            "stages": {} if staging is None else {"staging_cpu_ms": staging}}


def test_means_per_step_and_side() -> None:
    runs = {
        "A": [{"steps": [step("c8", 10, 6.0, 1.0), step("r50", 8, 7.0), step("c8", 99, 99, target="thumbor")]},
              {"steps": [step("c8", 20, 8.0, 2.0), step("r60", 10, 9.0)]}],
        "B": [{"steps": [step("c8", 30, 5.0, 0.5), step("r55", 12, 6.0)]}],
    }
    rows = {line.split(" | ")[2]: line for line in summary(runs).splitlines()[2:]}
    assert set(rows) == {"c8", "r (80%)"}  # the rates of open-loop steps differ between runs
    c8 = rows["c8"].strip("| ").split(" | ")
    assert c8[3:6] == ["15.00 / 30.00", "7.00 / 5.00", "10.00 / 10.00"]  # thumbor's steps left out
    assert c8[7] == "1.50 / 0.50"
    assert rows["r (80%)"].strip("| ").split(" | ")[7] == "- / -"  # no stage metrics: no number
