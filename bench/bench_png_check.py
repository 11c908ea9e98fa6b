"""What the PNG short-data check costs, on the corpus PNGs, against a whole conversion: the test of
the last row the data writes (resizer/imaging.py `_png_last_row_blank`), and the inflate of the image
data after Pillow's decode (`_png_data_short`) which runs only when that row is blank (timed alone
here, and as it cost when it ran on every PNG).

    .venv/bin/python bench/bench_png_check.py [--rounds 10]

CPU time of one thread (time.thread_time), one process: the check alone, and the engine's conversion
(fit inside 800x800 and 256x256, PNG out) with the check and with it switched off, interleaved.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_imaging import CORPUS  # noqa: E402
from resizer import imaging  # noqa: E402


def _cpu_ms(work, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.thread_time()
        work()
        times.append((time.thread_time() - started) * 1000)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    blank, inflate = imaging._png_last_row_blank, imaging._png_data_short
    variants = {"as it is": blank, "inflate always": lambda im, data: True, "no check": lambda im, data: False}
    print("| input | size | last row blank | inflate alone ms | box | conversion ms: " + " / ".join(variants) + " |")
    print("|---|---|---|---|---|---|")
    for path in sorted(CORPUS.glob("*.png")):
        data = path.read_bytes()
        facts = imaging.probe(data)
        decoded = imaging.Image.open(path)
        decoded.load()
        alone = _cpu_ms(lambda: inflate(data), args.rounds)
        for box in (800, 256):
            params = imaging.Params(width=box, height=box, format="png")
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(args.rounds):  # interleaved, so drift falls on all alike
                for name, variant in variants.items():
                    imaging._png_last_row_blank = variant
                    try:
                        times[name].append(_cpu_ms(lambda: imaging.resize(data, params), 1))
                    finally:
                        imaging._png_last_row_blank = blank
            print(f"| {path.name} | {facts.width}x{facts.height} | {blank(decoded, data)} | {alone:.1f} | {box} | "
                  + " / ".join(f"{median(t):.1f}" for t in times.values()) + " |")


if __name__ == "__main__":
    main()
