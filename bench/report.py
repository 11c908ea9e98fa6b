"""The Markdown report and the latency-versus-load plot of a bench_peers.py run.

    .venv/bin/python bench/report.py bench/results/peers-<time>.json   # re-render a stored run
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TARGET_RATE = 10_000  # resizes per second, the design's region (../shared/MISSION.md)
HEADROOM = 1.2


def _errors(step: dict) -> str:
    bad = {k: v for k, v in step["statuses"].items() if k != "200"}
    return ", ".join(f"{k}: {v}" for k, v in sorted(bad.items())) or "0"


def _cpu(step: dict) -> str:
    cpu = step["cpu_ms_per_request"]
    return " / ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k != "other") + f" / other {cpu['other']:.1f}"


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
        add("| target | load | answered 200 /s | p50 ms | p99 ms | p99.9 ms | non-200 | CPU ms per request "
            "(by component) | cores busy |")
        add("|---|---|---|---|---|---|---|---|---|")
        for s in steps:
            if (s["size"], s["images"]) == (size, images):
                add(f"| {s['target']} | {s['load']} | {s['throughput']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
                    f"| {s['p999_ms']:.1f} | {_errors(s)} | {_cpu(s)} | {s['machine_busy'] * cores:.2f} |")

    add("\n### This service at 80% of its peak (open loop, Poisson arrivals)\n")
    add("| output | input | rate /s | answered 200 /s | p99 ms by input | non-200 | API CPU ms/request "
        "| enqueue <= 10 ms | mean ms: auth / upload / staging / enqueue / queue wait / processing / result |")
    add("|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        if s["target"] == "service" and s["load"].startswith("r"):
            st = s["stages"]
            stages = " / ".join(f"{st.get(f'{k}_mean_ms', float('nan')):.1f}" for k in
                                ("auth", "upload", "staging", "enqueue", "queue_wait", "processing", "result_return"))
            by_input = ", ".join(f"{k.removeprefix('photo-').removesuffix('.jpg')}: {v:.0f}"
                                 for k, v in s["p99_ms_by_input"].items())
            add(f"| {s['size']}x{s['size']} | {s['images']} | {s['offered']:.0f} | {s['throughput']:.1f} | {by_input} "
                f"| {_errors(s)} | {s['cpu_ms_per_request'].get('api', float('nan')):.2f} "
                f"| {st.get('enqueue_share_le_10ms', float('nan')) * 100:.2f}% | {stages} |")

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
        add(f"| {size}x{size} | {images} | {o['throughput']:.1f} | {per_core:.1f} | {need:,.0f} | {math.ceil(need / cores):,} "
            f"| {math.ceil(need / 16):,} |")
    return "\n".join(lines)


def plot(steps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(s["size"], s["images"]) for s in steps}, key=lambda g: (-g[0], g[1]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 4), squeeze=False)
    colours = {"thumbor": "tab:orange", "service": "tab:blue"}
    for ax, (size, images) in zip(axes[0], groups):
        for target, colour in colours.items():
            rows = [s for s in steps if (s["target"], s["size"], s["images"]) == (target, size, images)
                    and s["load"].startswith("c") and s["ok"]]
            if not rows:
                continue
            x = [s["throughput"] for s in rows]
            ax.plot(x, [s["p50_ms"] for s in rows], "-o", color=colour, ms=3, label=f"{target} p50")
            ax.plot(x, [s["p99_ms"] for s in rows], "--o", color=colour, ms=3, label=f"{target} p99")
            for s in rows:
                ax.annotate(s["load"], (s["throughput"], s["p99_ms"]), fontsize=6, color=colour,
                            xytext=(2, 2), textcoords="offset points")
        ax.axhline(500, color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_title(f"fit {size}x{size}, {images} inputs", fontsize=9)
        ax.set_xlabel("answered (200) per second")
        ax.set_ylabel("latency ms (log)")
        ax.grid(True, which="both", lw=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("Latency versus load, closed loop c1..c128 (labels); dotted: the 500 ms SLO", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    run = json.loads(Path(sys.argv[1]).read_text())
    plot(run["steps"], Path(__file__).resolve().parent.parent / "docs" / "bench" / "latency-vs-load.png")
    print(report(run["ceiling"], run["steps"], run["cores"], run.get("quality")))
