"""Benchmark the image engine against a naive Pillow loop on the corpus photos.

Run from the project root:  .venv/bin/python bench/bench_imaging.py
Options: --rounds N, --photos GLOB (default photo-256k-*.jpg), --set NAME=VALUE (override an engine constant, e.g. JPEG_DRAFT_HEADROOM=1.0),
--encoders (also time the encoder settings behind ENCODER_DEFAULTS).
Speed is conversions per CPU-second (time.process_time, one process, one thread). Quality is PSNR
(RGB) and SSIM (luma, 7x7 box window; needs numpy) of each decoded output against a reference: a
Lanczos resize of the full decode, with no draft and no reducing_gap. Peak memory is how far resident
memory (VmHWM, Linux) rises during one conversion in a fresh child process, averaged over the photos.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageChops, ImageStat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from resizer import imaging  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"
PHOTOS_GLOB = "photo-256k-*.jpg"  # --photos
PHOTOS = sorted(CORPUS.glob(PHOTOS_GLOB))
BOXES = ((800, 800), (256, 256))
QUALITY = 85

try:
    import numpy as np
except ImportError:  # SSIM is optional; PSNR needs only Pillow
    np = None  # type: ignore[assignment]


def naive(data: bytes, box: tuple[int, int]) -> bytes:
    im = Image.open(io.BytesIO(data))
    im.thumbnail(box)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def engine(data: bytes, box: tuple[int, int]) -> bytes:
    params = imaging.Params(width=box[0], height=box[1], fit="inside", format="jpeg", quality=QUALITY)
    return imaging.resize(data, params).data


PIPELINES: dict[str, Callable[[bytes, tuple[int, int]], bytes]] = {"naive": naive, "engine": engine}


def reference(data: bytes, size: tuple[int, int]) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def psnr(a: Image.Image, b: Image.Image) -> float:
    rms = ImageStat.Stat(ImageChops.difference(a.convert("RGB"), b.convert("RGB"))).rms
    mse = sum(r * r for r in rms) / len(rms)
    return math.inf if mse == 0 else 10 * math.log10(255 * 255 / mse)


def ssim(a: Image.Image, b: Image.Image) -> float | None:
    if np is None:
        return None
    x = np.asarray(a.convert("L"), dtype=np.float64)
    y = np.asarray(b.convert("L"), dtype=np.float64)

    def mean7(z):  # 7x7 box mean over the valid region, by summed-area table
        s = np.pad(z, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        return (s[7:, 7:] - s[:-7, 7:] - s[7:, :-7] + s[:-7, :-7]) / 49

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = mean7(x), mean7(y)
    vx, vy, cxy = mean7(x * x) - mx * mx, mean7(y * y) - my * my, mean7(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def throughput(datas: list[bytes], box: tuple[int, int], rounds: int, per_round: int = 40) -> dict[str, float]:
    """Conversions per CPU-second of each pipeline: best of `rounds`, pipelines interleaved so that
    load from neighbours on a shared machine hits them alike."""
    for fn in PIPELINES.values():
        for data in datas:
            fn(data, box)  # warm up: plugin imports, first allocations
    best = dict.fromkeys(PIPELINES, 0.0)
    for _ in range(rounds):
        for name, fn in PIPELINES.items():
            started = time.process_time()
            for i in range(per_round):
                fn(datas[i % len(datas)], box)
            best[name] = max(best[name], per_round / (time.process_time() - started))
    return best


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child_memory(pipeline: str, box: tuple[int, int], photo: int) -> None:
    """In a fresh process (so freed memory from earlier work can't hide the peak): how far resident
    memory rises above its starting point during one conversion, in KiB."""
    data = PHOTOS[photo].read_bytes()
    Image.open(io.BytesIO(data)).size  # import plugins before the baseline
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak, to the current RSS
    PIPELINES[pipeline](data, box)
    print(_status_kib("VmHWM") - before)


def peak_memory_mib(pipeline: str, box: tuple[int, int], overrides: list[str]) -> float:
    """Mean over the photos of the peak growth, each photo in its own child process."""
    peaks = []
    for photo in range(len(PHOTOS)):
        args = [sys.executable, __file__, "--child", pipeline, f"{box[0]}x{box[1]}", str(photo),
                "--photos", PHOTOS_GLOB]
        for o in overrides:
            args += ["--set", o]
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        peaks.append(int(out.strip().splitlines()[-1]) / 1024)
    return statistics.mean(peaks)


def decoded_pixels(pipeline: str, data: bytes, box: tuple[int, int]) -> int:
    """Pixels the JPEG decoder produces: the full image for thumbnail() here, 1/s^2 after a draft."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if pipeline == "naive":
        im.draft(None, (box[0] * 2, box[1] * 2))  # what thumbnail() asks for, reducing_gap=2.0
        return im.size[0] * im.size[1]
    scale = min(box[0] / w, box[1] / h)
    shrink = 1 / scale
    s = next((s for s in (8, 4, 2) if s * imaging.JPEG_DRAFT_HEADROOM <= shrink), 1)
    return math.ceil(w / s) * math.ceil(h / s)


def _graphic() -> Image.Image:
    """A flat-colour chart with text and transparency: the kind of picture PNG output is for."""
    from PIL import ImageDraw

    im = Image.new("RGBA", (800, 600), (255, 255, 255, 0))
    draw = ImageDraw.Draw(im)
    for i in range(40):
        draw.rectangle((i * 20, 300 - i * 7, i * 20 + 15, 600), fill=(30 + i * 5, 100, 200 - i * 4, 255))
        draw.text((i * 20, 10 + i * 5), f"label {i}", fill=(0, 0, 0, 255))
    return im


def _time_save(im: Image.Image, fmt: str, opts: dict[str, object], runs: int) -> tuple[float, int]:
    best, size = math.inf, 0
    for _ in range(runs):
        buf = io.BytesIO()
        started = time.process_time()
        im.save(buf, fmt, **opts)
        best = min(best, time.process_time() - started)
        size = len(buf.getvalue())
    return best * 1000, size


def encoder_table() -> list[str]:
    """Time and size of encoder settings: a photo downscaled to 800x600 and 256x192, and for PNG
    also a flat 800x600 graphic."""
    src = Image.open(PHOTOS[0])
    src.load()
    photos = [src.resize((800, 600), Image.Resampling.LANCZOS), src.resize((256, 192), Image.Resampling.LANCZOS)]
    graphic = _graphic()
    rows = ["| format | settings | ms photo 800x600 | bytes | ms photo 256x192 | bytes | ms graphic 800x600 | bytes |",
            "|---|---|---|---|---|---|---|---|"]
    cases: list[tuple[str, dict[str, object]]] = [
        ("JPEG", {"quality": 80}), ("JPEG", {"quality": 80, "optimize": True}),
        ("JPEG", {"quality": 80, "progressive": True}), ("JPEG", {"quality": 80, "optimize": True, "progressive": True}),
        ("PNG", {"compress_level": 1}), ("PNG", {"compress_level": 3}), ("PNG", {"compress_level": 6}),
        ("PNG", {"compress_level": 9}),
        ("WEBP", {"quality": 80, "method": 0}), ("WEBP", {"quality": 80, "method": 4}),
        ("WEBP", {"quality": 80, "method": 6}),
        ("AVIF", {"quality": 60, "speed": 6, "max_threads": 1}), ("AVIF", {"quality": 60, "speed": 8, "max_threads": 1}),
        ("AVIF", {"quality": 60, "speed": 10, "max_threads": 1}),
    ]
    for fmt, opts in cases:
        runs = 3 if fmt in ("AVIF", "PNG") else 15
        cells = []
        for im in photos + ([graphic] if fmt == "PNG" else []):
            ms, size = _time_save(im, fmt, opts, runs)
            cells += [f"{ms:.1f}", f"{size}"]
        cells += ["", ""] * (3 - len(cells) // 2)
        rows.append(f"| {fmt.lower()} | {', '.join(f'{k}={v}' for k, v in opts.items())} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--photos", default="photo-256k-*.jpg", help="glob in ../shared/corpus")
    parser.add_argument("--encoders", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("PIPELINE", "WxH", "PHOTO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global PHOTOS, PHOTOS_GLOB
    PHOTOS_GLOB, PHOTOS = args.photos, sorted(CORPUS.glob(args.photos))
    if not PHOTOS:
        parser.error(f"no photos match {CORPUS / args.photos}")
    for override in args.set:
        name, value = override.split("=", 1)
        setattr(imaging, name, json.loads(value))
    if args.child:
        w, h = args.child[1].split("x")
        child_memory(args.child[0], (int(w), int(h)), int(args.child[2]))
        return

    datas = [p.read_bytes() for p in PHOTOS]
    print(f"Pillow {Image.__version__}, numpy {np.__version__ if np else 'not installed (no SSIM)'}, "
          f"{len(datas)} photos {Image.open(PHOTOS[0]).size[0]}x{Image.open(PHOTOS[0]).size[1]}, "
          f"JPEG q{QUALITY}, overrides: {args.set or 'none'}\n")
    print("| box | pipeline | conv/CPU-s | vs naive | PSNR dB | SSIM | mean bytes | peak RSS growth MiB | decoded px |")
    print("|---|---|---|---|---|---|---|---|---|")
    for box in BOXES:
        rates = throughput(datas, box, args.rounds)
        for name, fn in PIPELINES.items():
            rate, base = rates[name], rates["naive"]
            psnrs: list[float] = []
            ssims: list[float] = []
            sizes: list[int] = []
            for data in datas:
                out = fn(data, box)
                decoded = Image.open(io.BytesIO(out))
                ref = reference(data, decoded.size)
                psnrs.append(psnr(decoded, ref))
                if (value := ssim(decoded, ref)) is not None:
                    ssims.append(value)
                sizes.append(len(out))
            s = f"{statistics.mean(ssims):.4f}" if ssims else "n/a"
            mem = peak_memory_mib(name, box, args.set)
            px = decoded_pixels(name, datas[0], box)
            print(f"| {box[0]}x{box[1]} | {name} | {rate:.1f} | {rate / base:.2f}x | {statistics.mean(psnrs):.2f} "
                  f"| {s} | {statistics.mean(sizes):.0f} | {mem:.1f} | {px} |")
    if args.encoders:
        print()
        print("\n".join(encoder_table()))


if __name__ == "__main__":
    main()
