"""Interleaved A/B of two commits with bench_peers.py: on a machine whose speed drifts by 20-40%
within minutes, a change worth a few percent shows only as the mean of alternating runs.

    .venv/bin/python bench/ab.py efb93c7 . --pairs 3 -- --only service --sizes 256 --levels 8 --seconds 10
    .venv/bin/python bench/ab.py . . --b-args="--worker-pool solo"     # one commit, two settings

A and B are commits (or `.`: this checkout as it is, uncommitted changes included); `--a-args` and
`--b-args` add bench_peers.py arguments to one side only. Each commit runs
from a worktree next to this checkout (bench_peers.py finds the corpus at ../shared/corpus), sharing
this checkout's .venv; runs alternate A, B, A, B, ...; the worktrees are removed after, every run's
results kept in this checkout's bench/results/ab-<time>.json. The summary
is, per load step, each side's mean over its runs of throughput, CPU per request (API, worker,
broker), the API request thread's CPU in staging and enqueue, the share of enqueues under 10 ms, and
the p99 latency of the answered requests.
Open-loop steps are matched by kind (their rate is 80% of each run's own peak).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def checkout(commit: str) -> tuple[Path, bool]:
    """(directory to run in, whether it is a worktree made here)."""
    if commit == ".":
        return ROOT, False
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    tree = ROOT.parent / f"{ROOT.name}-ab-{sha[:8]}"
    if not tree.exists():
        git("worktree", "add", "--detach", str(tree), sha)
        (tree / ".venv").symlink_to(ROOT / ".venv")
    return tree, True


def run(tree: Path, bench_args: list[str]) -> dict:
    results = tree / "bench" / "results"
    before = set(results.glob("peers-*.json")) if results.exists() else set()
    subprocess.run([sys.executable, str(tree / "bench" / "bench_peers.py"), *bench_args], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL)
    (new,) = set(results.glob("peers-*.json")) - before
    return json.loads(new.read_text())


def step_key(step: dict) -> tuple[int, str, str]:
    load = step["load"] if step["load"][0] != "r" else "r (80%)"
    return step["size"], step["images"], load


METRICS = {
    "/s": lambda s: s["throughput"],
    "api ms": lambda s: s["cpu_ms_per_request"].get("api"),
    "worker ms": lambda s: s["cpu_ms_per_request"].get("worker"),
    "broker ms": lambda s: s["cpu_ms_per_request"].get("broker"),
    "staging ms": lambda s: s.get("stages", {}).get("staging_cpu_ms"),
    "enqueue ms": lambda s: s.get("stages", {}).get("enqueue_cpu_ms"),
    "enqueue <= 10 ms": lambda s: s.get("stages", {}).get("enqueue_share_le_10ms"),
    "p50 ms": lambda s: s.get("p50_ms"),
    "p99 ms": lambda s: s.get("p99_ms"),
    "non-200": lambda s: sum(n for code, n in s.get("statuses", {}).items() if code != "200"),
}


def summary(runs: dict[str, list[dict]]) -> str:
    values: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for side, results in runs.items():
        for result in results:
            for step in result["steps"]:
                if step["target"] != "service":
                    continue
                for name, get in METRICS.items():
                    value = get(step)
                    if value is not None:
                        values[step_key(step)][name][side].append(value)
    sides = list(runs)
    lines = ["| output | input | load | " + " | ".join(f"{m}: {' / '.join(sides)}" for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for (size, images, load), by_metric in sorted(values.items(), key=lambda kv: (-kv[0][0], kv[0][1], kv[0][2])):
        cells = []
        for name in METRICS:
            means = [mean(by_metric[name][side]) if by_metric[name][side] else None for side in sides]
            cells.append(" / ".join("-" if m is None else f"{m:.2f}" for m in means))
        lines.append(f"| {size}x{size} | {images} | {load} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="commit A (or . for this checkout)")
    parser.add_argument("b", help="commit B (or . for this checkout)")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--a-args", default="", help="bench_peers.py arguments for A only")
    parser.add_argument("--b-args", default="", help="bench_peers.py arguments for B only")
    parser.epilog = "Arguments after -- go to bench_peers.py (default: --only service --sizes 256 --levels 8 --seconds 10)."
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1:] or ["--only", "service", "--sizes", "256", "--levels", "8", "--seconds", "10"]
    trees = {side: checkout(commit) for side, commit in (("A", args.a), ("B", args.b))}
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    try:
        for pair in range(args.pairs):
            for side in ("A", "B"):
                print(f"pair {pair + 1}/{args.pairs}: {side} ({trees[side][0].name})", flush=True)
                extra = shlex.split(args.a_args if side == "A" else args.b_args)
                runs[side].append(run(trees[side][0], bench_args + extra))
    finally:
        for tree, made in trees.values():
            if made:
                git("worktree", "remove", "--force", str(tree))
    saved = ROOT / "bench" / "results" / f"ab-{time.strftime('%Y-%m-%dT%H%M%S')}.json"
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"a": [args.a, args.a_args], "b": [args.b, args.b_args], "runs": runs}))
    print(f"\nA = {args.a} {args.a_args}, B = {args.b} {args.b_args}; means over {args.pairs} interleaved runs each "
          f"(every run: {saved})\n")
    print(summary(runs))


if __name__ == "__main__":
    main()
