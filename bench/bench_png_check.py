"""What the PNG short-data check costs, on the corpus PNGs, against a whole conversion: the test of
the last row the data writes (resizer/imaging.py `_png_last_row_blank`), and the inflate of the image
data after Pillow's decode (`_png_data_short`) which runs only when that row is blank (timed alone
here, and as it cost when it ran on every PNG). Then the same for an APNG's later frames (fdAT), made
here from each corpus PNG (6 frames, each the picture rolled 7 px further; Pillow's writer): the test
of the row a frame's data writes last, before and after its decode (`_apng_frame_row`), and the inflate
of the frame's data, which runs only when that row stayed as it was.

    .venv/bin/python bench/bench_png_check.py [--rounds 10]

CPU time of one thread (time.thread_time), one process: the check alone, and the engine's conversion
(fit inside 800x800 and 256x256, PNG out) with the check and with it switched off, interleaved.
"""
from __future__ import annotations

import argparse
import io
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


def _conversions(data: bytes, box: int, rounds: int, name: str, variants: dict) -> list[float]:
    """The median conversion ms with imaging.`name` replaced by each variant in turn, interleaved so
    drift falls on all alike."""
    params = imaging.Params(width=box, height=box, format="png")
    original = getattr(imaging, name)
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for variant, function in variants.items():
            setattr(imaging, name, function)
            try:
                times[variant].append(_cpu_ms(lambda: imaging.resize(data, params), 1))
            finally:
                setattr(imaging, name, original)
    return [median(t) for t in times.values()]


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
            ms = _conversions(data, box, args.rounds, "_png_last_row_blank", variants)
            print(f"| {path.name} | {facts.width}x{facts.height} | {blank(decoded, data)} | {alone:.1f} | {box} | "
                  + " / ".join(f"{m:.1f}" for m in ms) + " |")

    row = imaging._apng_frame_row
    frame_variants = {"as it is": row, "inflate always": lambda im, data: b"", "no check": lambda im, data: None}
    print()
    print("| APNG of | frames | frame inflates | box | conversion ms: " + " / ".join(frame_variants) + " |")
    print("|---|---|---|---|---|")
    for path in sorted(CORPUS.glob("*.png")):
        still = imaging.Image.open(path)
        still.load()
        frames = [imaging.ImageChops.offset(still, 7 * i, 0) for i in range(6)]
        buf = io.BytesIO()
        frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], duration=100)
        data = buf.getvalue()
        counted: list[int] = []
        imaging._png_data_short = lambda data, frame=0: counted.append(frame) or inflate(data, frame)
        try:
            imaging.resize(data, imaging.Params(width=256, height=256, format="png"))
        finally:
            imaging._png_data_short = inflate
        for box in (800, 256):
            ms = _conversions(data, box, args.rounds, "_apng_frame_row", frame_variants)
            print(f"| {path.name} | {len(frames)} | {len(counted)} | {box} | " + " / ".join(f"{m:.1f}" for m in ms) + " |")


if __name__ == "__main__":
    main()
