"""The resample after a JPEG's scaled decode, by filter: what each costs and what it does to quality.
The engine decodes a 1280x960 photo at 1/2 scale for a 256 px box (resizer/imaging.py,
JPEG_DRAFT_HEADROOM) and resamples 640x480 -> 256x192 with Lanczos; this measures the other filters
Pillow offers on the same decode, and the decode itself, on one core.

    .venv/bin/python bench/bench_resample.py [--box 256] [--photos 'photo-256k-*.jpg']

Quality as bench_imaging.py: PSNR (RGB) and SSIM (luma) of the JPEG q85 output against a Lanczos
resize of the full decode; `thumbnail()` is issue 3's bar.
"""
from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path
from statistics import mean

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_imaging import CORPUS, psnr, ssim  # noqa: E402

FILTERS = {"lanczos": Image.Resampling.LANCZOS, "bicubic": Image.Resampling.BICUBIC,
           "hamming": Image.Resampling.HAMMING, "bilinear": Image.Resampling.BILINEAR}


def cpu_ms(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1000


def jpeg_q85(im: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--box", type=int, default=256)
    parser.add_argument("--photos", default="photo-256k-*.jpg")
    parser.add_argument("--repeat", type=int, default=100)
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, float | None, float]]] = {}
    for path in sorted(CORPUS.glob(args.photos)):
        data = path.read_bytes()
        full = Image.open(io.BytesIO(data)).convert("RGB")
        scale = min(args.box / full.width, args.box / full.height)
        size = (round(full.width * scale), round(full.height * scale))
        reference = full.resize(size, Image.Resampling.LANCZOS)
        naive = Image.open(io.BytesIO(data))
        naive.thumbnail((args.box, args.box))
        out = jpeg_q85(naive)
        rows.setdefault("thumbnail()", []).append((psnr(out, reference), ssim(out, reference), float("nan")))

        def decode(data: bytes = data) -> Image.Image:
            im = Image.open(io.BytesIO(data))
            draft = next((s for s in (8, 4, 2) if s * 1.5 <= 1 / scale), 1)  # as the engine picks it
            im.draft("RGB", (im.width // draft, im.height // draft))
            im.load()
            return im

        decoded = decode()
        rows.setdefault(f"scaled decode to {decoded.width}x{decoded.height}", []).append(
            (float("nan"), None, cpu_ms(decode, args.repeat)))
        for name, resample in FILTERS.items():
            out = jpeg_q85(decoded.resize(size, resample))
            rows.setdefault(f"then {name}", []).append(
                (psnr(out, reference), ssim(out, reference), cpu_ms(lambda: decoded.resize(size, resample), args.repeat)))
    print(f"| step | PSNR dB | SSIM | CPU ms (mean of {args.photos}, box {args.box}) |\n|---|---|---|---|")
    for name, values in rows.items():
        quality = [v[0] for v in values]
        similarity = [v[1] for v in values if v[1] is not None]
        cost = [v[2] for v in values]
        print(f"| {name} | {'' if quality[0] != quality[0] else f'{mean(quality):.2f}'} | "
              f"{f'{mean(similarity):.4f}' if similarity else ''} | "
              f"{'' if cost[0] != cost[0] else f'{mean(cost):.2f}'} |")


if __name__ == "__main__":
    main()
