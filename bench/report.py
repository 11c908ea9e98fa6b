"""The Markdown report and the latency-versus-load plot of a bench_peers.py run.

    .venv/bin/python bench/report.py bench/results/peers-<time>.json [--plot docs/bench/latency-vs-load.png]
"""
from __future__ import annotations

import json
import math
from pathlib import Path

TARGET_RATE = 10_000  # resizes per second, the design's region (../shared/MISSION.md)
HEADROOM = 1.2


def _errors(step: dict) -> str:
    bad = {k: v for k, v in step["statuses"].items() if k != "200"}
    return ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "0"


def _cpu(step: dict) -> str:
    cpu = step["cpu_ms_per_request"]
    return " / ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k != "other") + f" / other {cpu['other']:.1f}"


def _n(step: dict) -> str:
    return str(step["n"]) if "n" in step else "?"


def _p999(step: dict) -> str:
    """p99.9 only over 1,000 samples or more: below that it is the maximum, shown as such."""
    if step.get("n", 0) >= 1000:
        return f"{step['p999_ms']:.1f}"
    return f"(max {step['max_ms']:.1f})"


def peaks(steps: list[dict]) -> dict[tuple[str, int, str], dict]:
    best: dict[tuple[str, int, str], dict] = {}
    for s in steps:
        if not s["load"].startswith("c"):
            continue
        key = (s["target"], s["size"], s["images"])
        if key not in best or s["throughput"] > best[key]["throughput"]:
            best[key] = s
    return best


def report(ceilings: dict[str, float], steps: list[dict], cores: int, quality: list[dict] | None = None) -> str:
    lines: list[str] = []
    add = lines.append
    best = peaks(steps)
    groups = sorted({(s["size"], s["images"]) for s in steps}, key=lambda g: (-g[0], g[1]))

    add("### Peak throughput (closed loop, the best concurrency of each)\n")
    add("| output | input | ceiling: engine conv/CPU-s x cores | thumbor /s | this service /s | service / thumbor "
        "| service / ceiling |")
    add("|---|---|---|---|---|---|---|")
    for size, images in groups:
        ceiling = ceilings.get(f"{size}/{images}", float("nan")) * cores
        t, o = best.get(("thumbor", size, images)), best.get(("service", size, images))
        tt, ot = (t["throughput"] if t else float("nan")), (o["throughput"] if o else float("nan"))
        add(f"| {size}x{size} | {images} | {ceiling:.0f} | {tt:.1f} (c{t['offered'] if t else '-'}) "
            f"| {ot:.1f} (c{o['offered'] if o else '-'}) | {ot / tt:.2f}x | {ot / ceiling:.2f} |")

    for size, images in groups:
        add(f"\n### {size}x{size} from {images}: latency and CPU by load\n")
        add("| target | load | answered 200 /s | n | p50 ms | p99 ms | p99.9 ms | non-200 | CPU ms per answer "
            "(by component) | cores busy |")
        add("|---|---|---|---|---|---|---|---|---|---|")
        for s in steps:
            if (s["size"], s["images"]) == (size, images):
                add(f"| {s['target']} | {s['load']} | {s['throughput']:.1f} | {_n(s)} | {s['p50_ms']:.1f} "
                    f"| {s['p99_ms']:.1f} | {_p999(s)} | {_errors(s)} | {_cpu(s)} | {s['machine_busy'] * cores:.2f} |")

    add("\n### This service at 80% of its peak (open loop, Poisson arrivals)\n")
    add("| output | input | rate /s | answered 200 /s | p99 ms by input | non-200 | API CPU ms/request "
        "| enqueue <= 10 ms | mean ms: auth / line / upload / staging / enqueue / queue wait / processing / result |")
    add("|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        if s["target"] == "service" and s["load"].startswith("r"):
            st = s["stages"]
            stages = " / ".join(f"{st.get(f'{k}_mean_ms', float('nan')):.1f}" for k in
                                ("auth", "line", "upload", "staging", "enqueue", "queue_wait", "processing", "result_return"))
            by_input = ", ".join(f"{k.removeprefix('photo-').removesuffix('.jpg')}: {v:.0f}"
                                 + (f" (n {s['n_by_input'][k]})" if k in s.get("n_by_input", {}) else "")
                                 for k, v in s["p99_ms_by_input"].items())
            add(f"| {s['size']}x{s['size']} | {s['images']} | {s['offered']:.0f} | {s['throughput']:.1f} | {by_input} "
                f"| {_errors(s)} | {s['cpu_ms_per_request'].get('api', float('nan')):.2f} "
                f"| {st.get('enqueue_share_le_10ms', float('nan')) * 100:.2f}% | {stages} |")

    cpu_stages = ("auth", "line", "upload", "admission", "staging", "enqueue", "respond")
    open_steps = [s for s in steps if s["target"] == "service" and s["load"].startswith("r")
                  and f"{cpu_stages[0]}_cpu_ms" in s["stages"]]
    if open_steps:
        add("\n### The API's CPU per request at 80% load: its request thread by stage, and the rest\n")
        add("| output | input | API CPU ms | " + " | ".join(cpu_stages) + " | rest (gunicorn, Django, reply thread) |")
        add("|---|---|---|" + "---|" * (len(cpu_stages) + 1))
        for s in open_steps:
            api = s["cpu_ms_per_request"].get("api", float("nan"))
            # Runs before the line stage (2026-11-22) have none: shown as nan, its CPU then in upload.
            parts = [s["stages"].get(f"{k}_cpu_ms", float("nan")) for k in cpu_stages]
            add(f"| {s['size']}x{s['size']} | {s['images']} | {api:.2f} | " + " | ".join(f"{v:.2f}" for v in parts)
                + f" | {api - sum(v for v in parts if v == v):.2f} |")

    if quality:
        add("\n### Output quality (against a Lanczos resize of the full decode; mean over the inputs of each set)\n")
        add("| output | input | target | PSNR dB | SSIM | bytes |")
        add("|---|---|---|---|---|---|")
        for size, images in groups:
            prefix = "photo-256k" if images == "256k" else "photo-900k"
            for target in ("thumbor", "service"):
                rows = [q for q in quality if q["target"] == target and q["size"] == size
                        and q["input"].startswith(prefix)]
                if rows:
                    mean = lambda k: sum(q[k] for q in rows) / len(rows)  # noqa: E731
                    add(f"| {size}x{size} | {images} | {target} | {mean('psnr'):.2f} | {mean('ssim'):.4f} "
                        f"| {mean('bytes'):,.0f} |")

    add("\n### Capacity for 10,000 resizes/s with 20% headroom, from this run\n")
    add("| output | input | service peak /s on this machine | per core | cores needed | "
        f"{cores}-core machines | 16-core machines |")
    add("|---|---|---|---|---|---|---|")
    for size, images in groups:
        o = best.get(("service", size, images))
        if not o:
            continue
        per_core = o["throughput"] / cores
        need = TARGET_RATE * HEADROOM / per_core
        add(f"| {size}x{size} | {images} | {o['throughput']:.1f} | {per_core:.1f} | {need:,.0f} "
            f"| {math.ceil(need / cores):,} | {math.ceil(need / 16):,} |")

    # By tier, from the CPU each component spent per request at 80% load: in a region the tiers run
    # on their own machines, and each is sized by its own cost.
    tiers = ("api", "worker", "broker", "postgres")
    if open_steps:
        add(f"\n### Cores by tier for {TARGET_RATE:,} resizes/s with 20% headroom (CPU per request at 80% load)\n")
        add("| output | input | " + " | ".join(f"{t} ms/req -> cores" for t in tiers) + " | all tiers | per core |")
        add("|---|---|" + "---|" * (len(tiers) + 2))
        for s in open_steps:
            cpu = s["cpu_ms_per_request"]
            need = {t: TARGET_RATE * HEADROOM * cpu.get(t, 0.0) / 1000 for t in tiers}
            total = sum(need.values())
            add(f"| {s['size']}x{s['size']} | {s['images']} | "
                + " | ".join(f"{cpu.get(t, 0.0):.2f} -> {need[t]:,.0f}" for t in tiers)
                + f" | {total:,.0f} | {TARGET_RATE / total * HEADROOM:.1f} resizes/s |")
    return "\n".join(lines)


def plot(steps: list[dict], path: Path) -> None:
    """Per (output, input) column: answered and refused per second against the number of clients
    (top), and p50/p99 latency of the answered (bottom), for both targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(s["size"], s["images"]) for s in steps}, key=lambda g: (-g[0], g[1]))
    fig, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups), 6.4), squeeze=False, sharex=True)
    colours = {"thumbor": "tab:orange", "service": "tab:blue"}
    for col, (size, images) in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        for target, colour in colours.items():
            rows = [s for s in steps if (s["target"], s["size"], s["images"]) == (target, size, images)
                    and s["load"].startswith("c")]
            if not rows:
                continue
            clients = [s["offered"] for s in rows]
            refused = [sum(v for k, v in s["statuses"].items() if k != "200") / s["seconds"] for s in rows]
            top.plot(clients, [s["throughput"] for s in rows], "-o", color=colour, ms=3, label=f"{target} 200/s")
            if any(refused):
                top.plot(clients, refused, ":x", color=colour, ms=3, label=f"{target} refused/s")
            bottom.plot(clients, [s["p50_ms"] for s in rows], "-o", color=colour, ms=3, label=f"{target} p50")
            bottom.plot(clients, [s["p99_ms"] for s in rows], "--o", color=colour, ms=3, label=f"{target} p99")
        top.set_title(f"fit {size}x{size}, {images} inputs", fontsize=9)
        top.set_ylabel("per second")
        top.set_ylim(bottom=0)
        bottom.axhline(500, color="grey", lw=0.8, ls=":")
        bottom.set_yscale("log")
        bottom.set_ylabel("latency of each image, ms\n(first attempt to its 200)")
        bottom.set_xlabel("clients (closed loop, honoring Retry-After)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", lw=0.3)
            ax.legend(fontsize=6)
    fig.suptitle("Throughput and latency versus load, one run on 2 cores; dotted line: the 500 ms p99 SLO", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path, help="a bench/results/peers-<time>.json")
    parser.add_argument("--plot", type=Path, help="also draw the latency-versus-load plot here")
    args = parser.parse_args()
    run = json.loads(args.run.read_text())
    if args.plot:
        plot(run["steps"], args.plot)
    print(report(run["ceiling"], run["steps"], run["cores"], run.get("quality")))
