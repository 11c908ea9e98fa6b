"""The image engine: bytes in, resized bytes out, with every limit checked before pixels are decoded.

Pure functions with no Django or Celery inside; the API calls validate()/probe(), the workers resize().
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from PIL import AvifImagePlugin, Image, ImageChops, ImageCms, ImageFile, UnidentifiedImageError

# A truncated upload must fail as CorruptImage instead of being silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# One conversion per core: libavif's own decoder threads would oversubscribe the worker pool and
# escape cpu_seconds (which counts this thread only).
AvifImagePlugin.DEFAULT_MAX_THREADS = 1
# Pillow's own bomb guard (Image.MAX_IMAGE_PIXELS, ~89 MP warning / ~179 MP error) is left on as a
# process-wide backstop. Limits.max_pixels (50 MP by default) is checked as soon as the header is
# read, so with the defaults ours trips first; Pillow's error is mapped to the same ImageTooLarge.
# Raise Image.MAX_IMAGE_PIXELS too if you ever raise max_pixels above ~179 MP.

FITS = ("inside", "cover", "contain", "fill", "outside")
FORMATS = ("jpeg", "png", "webp", "avif", "gif")
GRAVITIES = (
    "center", "north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest", "entropy",
)
MAX_SIDE = 8192  # largest width or height a client may ask for

CONTENT_TYPES = {
    "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif", "gif": "image/gif",
}

# Encoder settings, from bench/bench_imaging.py --encoders (table in docs/IMAGING.md). The
# service pays per CPU-second, so nothing that costs a multiple of the encode for a few percent:
# jpeg: q80 4:2:0. optimize (two-pass Huffman) is 2x the encode time for 0.7% fewer bytes at
#   800x600 (2.7% at 256x192); progressive is 5x for 4%. Both off.
# png: zlib level 6: on a flat graphic (what PNG output is for) 38% smaller than level 3 for 1.5x
#   the time; level 9 takes 2.5x longer again for 6%.
# webp: method 4 (libwebp's default): 15% smaller than method 0; method 6 is 2.4x slower for 5%.
# avif: speed 8: 3x faster than libavif's default 6 for 3.5% more bytes; speed 10 is 4x faster
#   again but 11% bigger. One encoder thread, for the same reason as the decoder above.
# gif: Pillow's defaults. `quality` applies to jpeg, webp and avif only.
ENCODER_DEFAULTS: dict[str, dict[str, Any]] = {
    "jpeg": {"quality": 80, "optimize": False, "progressive": False, "subsampling": "4:2:0"},
    "png": {"compress_level": 6, "optimize": False},
    "webp": {"quality": 80, "method": 4},
    "avif": {"quality": 60, "speed": 8, "max_threads": 1},
    "gif": {},
}
_LOSSY = ("jpeg", "webp", "avif")
_ALPHA_OUTPUTS = ("png", "webp", "avif", "gif")
_ANIMATED_OUTPUTS = ("gif", "webp", "png")  # png: APNG; and AVIF for an animation that plays forever (_moves)
_ANIMATED_INPUTS = ("gif", "webp", "png", "avif")
# Largest side each format can carry (libjpeg 65500, libwebp 16383, GIF's 16-bit fields). AVIF's is
# the decoders' (libavif's default dimension limit, 32768; Pillow and browsers use libavif or alike),
# not the encoder's: at 65536 the engine made 10x40000 AVIFs that nothing, itself included, could open.
_ENCODER_MAX_SIDE = {"jpeg": 65_500, "webp": 16_383, "gif": 65_535, "avif": 32_768, "png": 2**31 - 1}

# Pillow plugin ids we allow, and our names for them. Everything else (EPS and PDF shell out to
# Ghostscript; SVG, PSD, ICO, FITS, ... are attack surface we do not need) is never tried.
_DECODERS = ["JPEG", "PNG", "WEBP", "GIF", "AVIF", "TIFF", "BMP"]
_FORMAT_NAMES = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "AVIF": "avif",
    "TIFF": "tiff", "BMP": "bmp",
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# How the shrinking is split, for speed at no loss of quality. Measured against a full-decode
# Lanczos reference (bench/bench_imaging.py); Pillow's thumbnail() is the bar to beat.
# 1. JPEG shrink-on-load: libjpeg decodes at 1/2, 1/4 or 1/8 scale (the cheapest way to shrink),
#    but only while the DCT-scaled image stays at least this many times the target, so the final
#    filter still has real anti-aliasing to do. At 1.0 (libvips' fastShrinkOnLoad) PSNR fell up to
#    0.5 dB below thumbnail()'s (256 px from 1280: -0.16 dB); from 1.5 on it was above it at every
#    size tried.
JPEG_DRAFT_HEADROOM = 1.5
# 2. Other formats: Image.reduce (a box filter) first, by whole factors that leave at least this
#    much for the resampler (Pillow's reducing_gap; thumbnail() uses the same 2.0).
REDUCING_GAP = 2.0
# 3. The resample: Lanczos when 1 or 2 made the image smaller first, so the final pass is cheap;
#    bicubic (as thumbnail() uses) when it runs on the full-size decode, where it is the dominant
#    cost and Lanczos is ~1.3x slower for ~0.3 dB (see _resample).

# What Pillow's decoders raise on bad bytes (RuntimeError: the AVIF plugin's decode failures).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, TypeError, ZeroDivisionError,
    KeyError, OverflowError, RuntimeError,
)
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_GRAVITY_XY = {
    "center": (0.5, 0.5), "entropy": (0.5, 0.5), "north": (0.5, 0.0), "northeast": (1.0, 0.0),
    "east": (1.0, 0.5), "southeast": (1.0, 1.0), "south": (0.5, 1.0), "southwest": (0.0, 1.0),
    "west": (0.0, 0.5), "northwest": (0.0, 0.0),
}


@dataclass(frozen=True)
class Params:
    width: int | None = None
    height: int | None = None
    fit: str = "inside"
    format: str | None = None  # None = same as input; "auto" = pick from `accept`
    quality: int | None = None  # None = per-format default
    gravity: str = "center"  # cover crop position; contain placement
    background: str | None = None  # "#rrggbb", "rrggbb" or "rrggbbaa"
    enlarge: bool = False  # inside/outside never upscale unless True
    # Output formats the client accepts, for format="auto"; "*" when it takes any image (image/*, */*).
    accept: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    max_input_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_frames: int = 300
    max_animation_pixels: int = 200_000_000
    max_output_pixels: int = 50_000_000
    # The encoded output's bytes: 50 MP of noise as PNG is 117 MB (and 58 MB as JPEG at quality 100),
    # each held in the worker's memory, kept in the staging store and sent to the client.
    max_output_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImageFacts:
    format: str
    width: int  # as stored: before EXIF orientation is applied
    height: int
    bytes: int
    frames: int = 1
    mode: str = ""
    has_alpha: bool = False
    plays: int = 0  # how many times an animation plays, from its header (0: forever); not kept in jobs


@dataclass(frozen=True)
class Result:
    data: bytes
    content_type: str
    input: ImageFacts
    output: ImageFacts  # width/height of the upright output
    cpu_seconds: float


class ImageError(Exception):
    """Base of every error the engine raises for bad input; carries what the API needs."""

    status: int = 422
    code: str = "image_error"

    def __init__(self, message: str) -> None:
        # The message reaches the customer as the problem's `detail`: always a sentence.
        message = message[:1].upper() + message[1:]
        if not message.endswith((".", "?", "!")):
            message += "."
        super().__init__(message)
        self.message = message


class UnsupportedImage(ImageError):
    status, code = 415, "unsupported_media_type"


class CorruptImage(ImageError):
    status, code = 422, "corrupt_image"


class ImageTooLarge(ImageError):
    status, code = 422, "image_too_large"


class InputTooLarge(ImageError):
    status, code = 413, "payload_too_large"


class OutputTooLarge(ImageError):
    status, code = 422, "output_too_large"


class InvalidParameters(ImageError):
    status, code = 400, "invalid_parameter"


# --- parameters ---------------------------------------------------------------------------------


def _format_name(value: str) -> str:
    name = value.strip().lower().removeprefix("image/")
    return "jpeg" if name == "jpg" else name


def parse_background(value: str) -> tuple[int, int, int, int]:
    digits = value.removeprefix("#")
    if len(digits) not in (6, 8) or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise InvalidParameters("background must be a hex colour: rrggbb or rrggbbaa, optionally with '#'")
    r, g, b = (int(digits[i:i + 2], 16) for i in (0, 2, 4))
    return r, g, b, int(digits[6:8], 16) if len(digits) == 8 else 255


def validate(params: Params) -> None:
    """Raise InvalidParameters unless `params` describe a resize we can do."""
    for name in ("width", "height"):
        value = getattr(params, name)
        if value is not None and (type(value) is not int or not 1 <= value <= MAX_SIDE):
            raise InvalidParameters(f"{name} must be an integer from 1 to {MAX_SIDE}")
    if params.width is None and params.height is None:
        raise InvalidParameters("width or height is required")
    if params.fit not in FITS:
        raise InvalidParameters(f"fit must be one of {', '.join(FITS)}")
    if params.gravity not in GRAVITIES:
        raise InvalidParameters(f"gravity must be one of {', '.join(GRAVITIES)}")
    if params.format is not None and (
        not isinstance(params.format, str) or _format_name(params.format) not in (*FORMATS, "auto")
    ):
        raise InvalidParameters(f"format must be one of {', '.join(FORMATS)} or auto")
    if params.quality is not None and (type(params.quality) is not int or not 1 <= params.quality <= 100):
        raise InvalidParameters("quality must be an integer from 1 to 100")
    if params.background is not None:
        if not isinstance(params.background, str):
            raise InvalidParameters("background must be a hex colour")
        parse_background(params.background)
    if not isinstance(params.enlarge, bool):
        raise InvalidParameters("enlarge must be a boolean")
    if not isinstance(params.accept, (tuple, list)) or not all(isinstance(a, str) for a in params.accept):
        raise InvalidParameters("accept must be a list of format names")


def output_format(params: Params, facts: ImageFacts) -> str:
    """Resolve format None (same as input) or "auto" (best the client accepts) to one of FORMATS."""
    wanted = _format_name(params.format) if params.format else None
    if wanted in FORMATS:
        return wanted
    default = facts.format if facts.format in FORMATS else ("png" if facts.has_alpha else "jpeg")
    if wanted == "auto":
        names = [_format_name(a) for a in params.accept]
        # `-name`: a format the client refuses (q=0; controlplane/parsing.py): never picked, wildcard or not.
        # `~webp`: taken, but rated below AVIF: only where AVIF cannot serve (an animation it would stop).
        refused = {name[1:] for name in names if name.startswith("-")}
        accepted = {name for name in names if not name.startswith(("-", "~"))}
        animated = facts.frames > 1 and facts.format in _ANIMATED_INPUTS
        # Where the client named types and not the input's, or refused the input's: one it takes,
        # keeping the motion (GIF, APNG) and then the alpha where it can.
        fallbacks = ((("gif", "png") if animated else ()) + (("png", "webp", "gif") if facts.has_alpha else ())
                     + ("jpeg", "png", "gif"))
        if animated and not _moves("avif", facts):
            # An animation that plays a set number of times: AVIF would be its first frame (_moves).
            # WebP where the client takes it, else the input's format (which moves) or a fallback.
            if "webp" in accepted or "~webp" in names:
                return "webp"
        elif "avif" in accepted:
            return "avif"
        elif "webp" in accepted:
            return "webp"
        if default in refused or (accepted and "*" not in accepted and default not in accepted):
            for fmt in fallbacks:
                if fmt in accepted or ("*" in accepted and fmt not in refused):
                    return fmt
    return default


def _moves(fmt: str, facts: ImageFacts) -> bool:
    """Whether `fmt` output keeps the input's motion (else it is the first frame). AVIF only for an
    animation that plays forever: Pillow's writer sets no play count, and what it writes repeats without
    end, so a GIF that plays once (an intro, say) would loop. Until 2026-11-23 AVIF output was always a
    still, and an animated AVIF with no `format` came back as WebP."""
    if facts.frames <= 1 or facts.format not in _ANIMATED_INPUTS:
        return False
    return fmt in _ANIMATED_OUTPUTS or (fmt == "avif" and facts.plays == 0)


def target_size(src_w: int, src_h: int, params: Params) -> tuple[int, int]:
    """Output width and height for an upright src_w x src_h source, per sharp's fit semantics.

    Pass upright dimensions (after EXIF orientation), which are not always what probe() reports.
    With both sides given: cover, contain and fill give exactly width x height; inside scales to fit
    within the box, outside to cover it, both keeping the aspect ratio and, unless enlarge, never
    above the source size. With one side given the other follows from the aspect ratio, except for
    fill, which like sharp leaves the unspecified side at the source size. No side is ever 0.
    """
    w, h = params.width, params.height
    if w is None and h is None:
        raise InvalidParameters("width or height is required")
    if params.fit == "fill" or (w and h and params.fit in ("cover", "contain")):
        return w or src_w, h or src_h
    if w and h:
        scale = (min if params.fit == "inside" else max)(w / src_w, h / src_h)
    else:
        scale = w / src_w if w else h / src_h  # type: ignore[operator]
    if not params.enlarge and params.fit in ("inside", "outside") and scale > 1:
        return src_w, src_h
    # The side that defines the scale comes out exact; only the derived side is rounded.
    out_w = w if w and scale == w / src_w else max(1, _round_half_up(src_w * scale))
    out_h = h if h and scale == h / src_h else max(1, _round_half_up(src_h * scale))
    return out_w, out_h


def _round_half_up(x: float) -> int:
    """As libvips (and so sharp) rounds sizes; Python's round() takes .5 to the even side (918.5 -> 918)."""
    return math.floor(x + 0.5)


# --- decoding -----------------------------------------------------------------------------------


@contextmanager
def _decoding() -> Iterator[None]:
    """Map whatever a decoder throws at hostile bytes onto our errors (MemoryError passes)."""
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"image too large: {e}") from e
    except _DECODE_ERRORS as e:
        raise CorruptImage(f"corrupt or truncated image: {e}") from e
    except Warning as e:  # only raised where warnings are errors (e.g. strict test settings)
        raise CorruptImage(f"suspicious image data: {e}") from e


def _looks_like_ours(head: bytes) -> bool:
    """Magic numbers of the formats we decode: when Pillow can't parse these, the file is broken."""
    return (
        head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM"))
        or head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        or (head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"))
    )


# Pillow decodes run-length BMP (RLE8, RLE4) in Python, ~0.13 s a megapixel whatever the file's
# size (a 29 KB file can declare 50 MP of one-pixel runs): such files get a smaller pixel limit.
_BMP_RLE_MAX_PIXELS = 4_000_000
# A PNG's chunks are walked in Python (here, and by Pillow up to the pixels): millions of empty ones
# in a 25 MB body would cost seconds of CPU. Real files have tens, or a few thousand IDATs (25 MB in
# libpng's 8 KB ones is ~3,200; an APNG's 300 frames, two or three chunks each). Until 2026-11-23 the
# cap was 100,000: a valid 1.2 MB file of 99,990 empty chunks cost the API ~0.25 s of CPU in probe(),
# unbilled (the security review); 20,000 bounds that at ~0.05 s.
_PNG_MAX_CHUNKS = 20_000


def _png_error(data: bytes) -> str | None:
    """Pillow checks CRCs only on the chunks before the pixels; a flipped bit in IDAT would decode
    as silent garbage, so every chunk is checked here (a few ms for the largest allowed input).
    Run before Pillow opens the file, so a file of countless chunks is refused before its walk."""
    view, walked = memoryview(data), 0
    for kind, start, end in _png_chunks(data):
        if walked == _PNG_MAX_CHUNKS:
            break
        walked += 1
        if zlib.crc32(view[start - 4:end]) != struct.unpack_from(">I", data, end)[0]:
            return f"bad CRC in PNG chunk {kind.decode('latin-1')!r} at byte {start - 8}"
        if kind == b"IEND":
            return None
    # Up to IEND, or truncated (the decoder reports that) before the cap.
    return f"PNG has more than {_PNG_MAX_CHUNKS} chunks" if walked == _PNG_MAX_CHUNKS else None


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, where its data starts, where it ends) of each whole chunk of a PNG, in order, up to IEND
    or the first chunk the file cuts short."""
    pos = 8
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        yield kind, pos + 8, end
        if kind == b"IEND":
            return
        pos = end + 4


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_last_written_row(height: int, interlaced: bool) -> int | None:
    """The row of an image (or APNG frame) `height` rows high that its data writes last: its last row,
    or with Adam7 interlacing its last odd row (written by the seventh pass alone, the last in the
    data); None for an interlaced image of one row, which is always checked."""
    if not interlaced:
        return height - 1
    if height < 2:
        return None
    return height - 1 if height % 2 == 0 else height - 2


def _png_last_row_blank(im: Image.Image, data: bytes) -> bool:
    """Whether the last row the image data writes decoded as all zero bytes, as Pillow leaves a row the
    data never reached: only then can the data be short, and only then is it inflated again
    (`_png_data_short`; on every PNG it cost 4-19% of a conversion)."""
    row = _png_last_written_row(im.height, bool(data[28]))
    return row is None or not im.crop((0, row, im.width, row + 1)).tobytes().strip(b"\0")


def _apng_frame_row(im: ImageFile.ImageFile, data: bytes) -> bytes:
    """The canvas row, inside the current APNG frame's rectangle, that the frame's data writes last, read
    from the canvas without loading the frame (b"" for an interlaced frame of one row: always checked).
    Pillow decodes a later frame onto the canvas, so a row its data never reached keeps what was there:
    read before and after the frame's decode, a row left as it was is the one sign that the data may be
    short, and only then is it inflated again (`_png_data_short`). Encoders crop a frame to where it
    differs from the canvas, so its last row changes (and otherwise the check costs an inflate)."""
    x0, y0, x1, y1 = (int(v) for v in im.dispose_extent)  # type: ignore[attr-defined]
    row = _png_last_written_row(y1 - y0, bool(data[28]))
    if row is None:
        return b""
    return im._new(im.im.crop((x0, y0 + row, x1, y0 + row + 1))).tobytes()


def _apng_frame_data(data: bytes, frame: int) -> tuple[int, int, list[memoryview]]:
    """The size of an APNG's `frame`-th frame held in fdAT chunks (1 the first: Pillow's frame number,
    whether the IDAT image is the first frame or a still fallback before them) and its image data (the
    chunks' payloads after their sequence numbers)."""
    view, width, height, found, counted = memoryview(data), 0, 0, 0, False
    pieces: list[memoryview] = []
    for kind, start, end in _png_chunks(data):
        if kind == b"fcTL":
            if pieces:
                break
            if end - start >= 12:
                width, height = struct.unpack_from(">II", data, start + 4)
            counted = False
        elif kind == b"fdAT" and end - start >= 4:
            if not counted:
                found, counted = found + 1, True
            if found == frame:
                pieces.append(view[start + 4:end])
    return width, height, pieces


def _png_data_short(data: bytes, frame: int = 0) -> str | None:
    """Why a PNG's image data (its IDAT chunks; with `frame`, that APNG frame's fdAT chunks) holds fewer
    bytes than its rows need, or None. Pillow fills the missing rows with black (a later APNG frame's
    with what the canvas held there) without a word (libpng, hence sharp, refuses the file); only
    counting the inflated bytes tells. Run after Pillow's decode (the size limits are checked by then)
    and stopped at the size the header (or the frame's fcTL) declares: one more inflate, ~30% of a PNG's
    decode, so only where the last row the data writes came out blank (or, in a later APNG frame, as
    the canvas held it)."""
    width, height, depth, colour, _, _, interlace = struct.unpack_from(">IIBBBBB", data, 16)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour)
    if channels is None:
        return None  # Pillow has refused it already
    view = memoryview(data)
    if frame:
        width, height, frame_pieces = _apng_frame_data(data, frame)
        pieces: Iterator[memoryview] = iter(frame_pieces)
    else:
        pieces = (view[start:end] for kind, start, end in _png_chunks(data) if kind == b"IDAT")

    def rows(w: int, h: int) -> int:  # a filter byte and the samples, a row
        return (1 + (w * channels * depth + 7) // 8) * h if w and h else 0

    if interlace:
        expected = sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)
    else:
        expected = rows(width, height)
    inflate, produced = zlib.decompressobj(), 0
    what = f"APNG frame {frame}'s image data" if frame else "PNG image data"
    try:
        for piece in pieces:
            if produced >= expected or inflate.eof:
                break
            pending: Any = piece
            while pending and produced < expected and not inflate.eof:
                produced += len(inflate.decompress(pending, min(1 << 20, expected - produced)))
                pending = inflate.unconsumed_tail
    except zlib.error as e:
        return f"{what} is corrupt ({e})"
    if produced < expected:
        return f"{what} is short: {produced} of the {expected} bytes its {width}x{height} " + (
            "frame needs" if frame else "header needs")
    return None


def _gif_check(data: bytes, limits: Limits) -> None:
    """Refuse a GIF that must not reach Pillow, from its blocks alone: a frame reaching past max_pixels,
    or frames whose canvases (Pillow grows the canvas to every frame's extent and decodes each frame
    at that size) add up past max_animation_pixels. Pillow allocates a frame's canvas when it opens
    or seeks to it, before any check of ours could run: 43 bytes can ask for a 169 MP frame. The walk
    stops one frame past max_frames (counted again, and refused, by _open)."""
    if len(data) < 13:
        return  # Pillow says what is wrong with it
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    canvas_w, canvas_h, decoded, frames = width, height, 0, 0
    # Legitimate GIFs hold their data in sub-blocks of up to 255 bytes; one cut into countless tiny
    # blocks would cost seconds of Python here (and in Pillow's own walk): refused.
    budget = len(data) // 64 + 10_000
    try:
        while position < len(data) and frames <= limits.max_frames:
            block = data[position]
            if block == 0x3B:  # trailer
                break
            if block == 0x21:  # extension: label, then data sub-blocks
                position += 2
            elif block != 0x2C:  # a stray byte: Pillow skips it and reads on, so does this walk
                position += 1
                budget -= 1
                if budget < 0:
                    raise CorruptImage("the GIF is cut into too many tiny blocks")
                continue
            else:  # image descriptor, optional local colour table, LZW code size
                left, top, w, h, local = struct.unpack_from("<HHHHB", data, position + 1)
                if (left + w) * (top + h) > limits.max_pixels:
                    raise ImageTooLarge(f"frame {frames} reaches {left + w}x{top + h} pixels; "
                                        f"the limit is {limits.max_pixels} pixels")
                canvas_w, canvas_h = max(canvas_w, left + w), max(canvas_h, top + h)
                decoded += canvas_w * canvas_h
                frames += 1
                if frames > 1 and decoded > limits.max_animation_pixels:
                    raise ImageTooLarge(f"the animation's frames decode to more than {limits.max_animation_pixels} "
                                        f"pixels in all (a {canvas_w}x{canvas_h} canvas by frame {frames - 1})")
                position += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
            while (size := data[position]) != 0:  # data sub-blocks
                position += size + 1
                budget -= 1
                if budget < 0:
                    raise CorruptImage("the GIF is cut into too many tiny blocks")
            position += 1
            budget -= 1
    except (IndexError, struct.error):
        return  # cut short: the trailer check in _open refuses it


# Real JPEGs hold a few dozen segments before their scan (a split ICC profile adds at most 255) and
# no more than a few fill bytes between them. Pillow walks them in Python (fill bytes one at a time)
# and keeps every APPn segment: 4 MB of empty segments cost ~1 s of the API's CPU in probe().
_JPEG_MAX_SEGMENTS = 1_000
_JPEG_MAX_FILL = 4_096
_JPEG_FILL = re.compile(rb"\xff+")
# Scans, counted by walking the markers from the first scan to the end of the image
# (_jpeg_scans_check). libjpeg writes 10 scans for a progressive colour
# image (6 grey), mozjpeg's scan search about as many, jpegtran scripts rarely more than a few dozen.
# libjpeg walks every block of the image again for each scan,
# even a bogus repeated one (a warning only), in one C call no time limit can interrupt: 3,000 copies
# of a 31-byte scan on a 4000x4000 grey image cost ~3.7 s of worker CPU. At this bound a 50 MP image
# costs about a second at worst.
_JPEG_MAX_SCANS = 256
# Bytes that are not 0xFF between segments: Pillow skips them one per Python loop (26 MB of zeros:
# 1.7 s of the API's CPU in probe(), ~65 ns a byte). libjpeg warns of "extraneous bytes" and reads
# on; real files have none or a handful. This many cost Pillow ~4 ms.
_JPEG_MAX_JUNK = 65_536


# A marker that can end entropy-coded data: 0xFF then anything but 0x00 (a stuffed 0xFF), a restart
# (0xD0-0xD7) or another 0xFF (fill).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


def _jpeg_scans_check(data: bytes, position: int) -> None:
    """Refuse more than _JPEG_MAX_SCANS scans, walking the markers from the first scan (at `position`)
    to the end of the image: each segment skipped by its length, each scan's entropy-coded data to the
    next marker (a regular expression: C speed). Whatever follows the end of the image is not read: a
    motion photo carries its video there, and counting FF DA pairs to the end of the file (as at first,
    2026-11-22) found one in every 64 KiB of it and refused such a photo past ~16 MB. Markers between
    the scans are bounded too (real files have two or three a scan)."""
    scans = markers = 0
    while position + 4 <= len(data):
        marker = data[position + 1]
        if marker == 0xD9:  # end of image
            return
        markers += 1
        if marker == 0xDA:
            scans += 1
            if scans > _JPEG_MAX_SCANS:
                raise CorruptImage(f"the JPEG has more than {_JPEG_MAX_SCANS} scans")
        if markers > _JPEG_MAX_SEGMENTS + 4 * _JPEG_MAX_SCANS:
            raise CorruptImage(f"the JPEG has more than {_JPEG_MAX_SEGMENTS + 4 * _JPEG_MAX_SCANS} segments between its scans")
        found = _JPEG_MARKER.search(data, position + 2 + struct.unpack_from(">H", data, position + 2)[0])
        if found is None:
            return  # cut short: Pillow says so
        position = found.start()


def _jpeg_check(data: bytes) -> None:
    """Refuse a JPEG whose header (SOI to the first scan) is flooded with segments, fill bytes or
    junk, or which holds more scans than any encoder writes."""
    position, segments, fill, junk = 2, 0, 0, 0
    while position < len(data):
        if data[position] != 0xFF:  # junk between segments: Pillow skips it byte by byte, so do we, at C speed
            found = data.find(b"\xff", position)
            junk += (len(data) if found < 0 else found) - position
            position = len(data) if found < 0 else found
        if junk > _JPEG_MAX_JUNK:
            raise CorruptImage(f"the JPEG has more than {_JPEG_MAX_JUNK} stray bytes between its header segments")
        if position >= len(data):
            return  # cut short: Pillow says so
        run = _JPEG_FILL.match(data, position)
        assert run is not None
        fill += run.end() - position - 1
        if fill > _JPEG_MAX_FILL:
            raise CorruptImage(f"the JPEG has more than {_JPEG_MAX_FILL} fill bytes between its header segments")
        if run.end() >= len(data):
            return  # cut short: Pillow says so
        marker = data[run.end()]
        if marker == 0xDA:  # start of scan: the header is over
            _jpeg_scans_check(data, run.end() - 1)
            return
        if marker == 0xD9:  # end of image
            return
        if marker == 0x00:  # FF 00 (stuffed 0xFF) outside a scan: Pillow skips it as junk, so do we
            junk += 2
            position = run.end() + 1
            continue
        segments += 1
        if segments > _JPEG_MAX_SEGMENTS:
            raise CorruptImage(f"the JPEG has more than {_JPEG_MAX_SEGMENTS} header segments")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            position = run.end() + 1
            continue
        if run.end() + 3 > len(data):
            return
        position = run.end() + 1 + struct.unpack_from(">H", data, run.end() + 1)[0]


# Pillow builds one Python object per strip or tile offset of a TIFF's first directory as it opens
# it, and a strip list may wrap around the image any number of times: 2 MB of offsets on a 1x2
# image cost 1.7 s of CPU and 256 MB in probe(). Real files: a strip per row of a 50 MP image is
# ~8,000; 128 x 128 tiles over it ~3,000. Directories hold dozens of entries, not thousands.
_TIFF_MAX_OFFSETS = 131_072
_TIFF_MAX_ENTRIES = 4_096
_TIFF_MAX_SAMPLES = 256  # BitsPerSample and the like: one value per sample
_TIFF_OFFSET_TAGS = (273, 279, 324, 325)  # strip offsets and byte counts, tile offsets and byte counts
_TIFF_SAMPLE_TAGS = (258, 338, 339, 340, 341)  # bits per sample, extra samples, sample format, min/max


def _tiff_check(data: bytes) -> None:
    """Refuse a TIFF whose first directory asks Pillow for millions of objects at open."""
    order = "<" if data[:2] == b"II" else ">"
    try:
        version = struct.unpack_from(order + "H", data, 2)[0]
        if version == 42:
            position = struct.unpack_from(order + "I", data, 4)[0]
            entries = struct.unpack_from(order + "H", data, position)[0]
            entry_format, entry_size, first = order + "HHI", 12, position + 2
        elif version == 43:  # BigTIFF
            position = struct.unpack_from(order + "Q", data, 8)[0]
            entries = struct.unpack_from(order + "Q", data, position)[0]
            entry_format, entry_size, first = order + "HHQ", 20, position + 8
        else:
            return
        if entries > _TIFF_MAX_ENTRIES:
            raise CorruptImage(f"the TIFF's first directory has {entries} entries; at most {_TIFF_MAX_ENTRIES}")
        for index in range(entries):
            tag, _kind, count = struct.unpack_from(entry_format, data, first + index * entry_size)
            if tag in _TIFF_OFFSET_TAGS and count > _TIFF_MAX_OFFSETS:
                raise ImageTooLarge(f"the TIFF is cut into {count} strips or tiles; the limit is {_TIFF_MAX_OFFSETS}")
            if tag in _TIFF_SAMPLE_TAGS and count > _TIFF_MAX_SAMPLES:
                raise CorruptImage(f"the TIFF declares {count} samples a pixel")
            if tag == 320 and count > 3 * 65_536:  # ColorMap: 3 x 2^bits values at most
                raise CorruptImage(f"the TIFF's colour map has {count} values")
    except struct.error:
        return  # cut short: Pillow says what is wrong with it


def _gif_frames(im: ImageFile.ImageFile, cap: int) -> int:
    """A GIF's frame count, walking at most one frame past `cap`: Pillow's n_frames walks them all
    in Python, ~5 us each, and a 25 MB GIF of 1x1 frames holds ~2 million (seconds of API CPU).
    The walk is n_frames' own (Pillow's GIF plugin, pinned in requirements.txt)."""
    current = im.tell()
    try:
        while im.tell() < cap:
            im._seek(im.tell() + 1, False)  # type: ignore[attr-defined]
    except EOFError:
        pass
    count = im.tell() + 1
    im.seek(current)
    return count


def _open(data: bytes, limits: Limits) -> tuple[ImageFile.ImageFile, ImageFacts]:
    if not data:
        raise CorruptImage("empty body")
    if len(data) > limits.max_input_bytes:
        raise InputTooLarge(f"input is {len(data)} bytes; the limit is {limits.max_input_bytes}")
    if data.startswith(b"\x89PNG\r\n\x1a\n") and (png_error := _png_error(data)):
        raise CorruptImage(png_error)
    if data.startswith((b"GIF87a", b"GIF89a")):
        _gif_check(data, limits)
    if data.startswith(b"\xff\xd8"):
        _jpeg_check(data)
    if data.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        _tiff_check(data)
    with _decoding():
        try:
            im = Image.open(io.BytesIO(data), formats=_DECODERS)
        except Image.DecompressionBombError as e:
            # Pillow's guard (~179 MP) fires in open(), before the size check below: say our limit,
            # not Pillow's (which read "could be decompression bomb DOS attack").
            declared = re.search(r"\((\d+) pixels\)", str(e))
            raise ImageTooLarge(f"image is {declared.group(1) if declared else 'more than 179000000'} pixels; "
                                f"the limit is {limits.max_pixels} pixels") from e
        except UnidentifiedImageError as e:
            if _looks_like_ours(data[:16]):
                raise CorruptImage("unreadable image header") from e
            raise UnsupportedImage("not a JPEG, PNG, WebP, GIF, AVIF, TIFF or BMP image") from e
        fmt = _FORMAT_NAMES[im.format or ""]
        width, height = im.size
        if width < 1 or height < 1:
            raise CorruptImage(f"image declares a size of {width}x{height}")
        if width * height > limits.max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
        if fmt == "bmp" and im.info.get("compression") in (1, 2) and width * height > _BMP_RLE_MAX_PIXELS:
            raise ImageTooLarge(f"run-length BMP is {width}x{height} pixels; the limit for that kind is "
                                f"{_BMP_RLE_MAX_PIXELS} pixels")
        # TIFF pages are not an animation and only the first is ever decoded, so they are not
        # counted (counting walks every IFD in Python).
        if fmt == "tiff":
            frames = 1
        elif fmt == "gif":
            frames = _gif_frames(im, limits.max_frames)
        else:
            frames = max(1, int(getattr(im, "n_frames", 1)))
        if frames > limits.max_frames:
            raise ImageTooLarge(f"image has more than {limits.max_frames} frames; the limit is {limits.max_frames}")
        if frames > 1 and frames * width * height > limits.max_animation_pixels:
            raise ImageTooLarge(
                f"animation is {frames} frames of {width}x{height}; the limit is "
                f"{limits.max_animation_pixels} pixels in all"
            )
        if fmt == "png" and frames > 1 and data[28:29] not in (b"", b"\x00"):
            # Pillow 13.0.0 cannot decode an interlaced APNG's later frames (it adds the interlace flag
            # to its decoder's settings at each frame, and the decoder refuses them): said as what it is,
            # not passed off as a corrupt file (docs/IMAGING.md).
            raise UnsupportedImage("an interlaced animated PNG cannot be read; save it without interlacing")
        if fmt == "gif" and not data.rstrip(b"\x00").endswith(b";"):
            # Pillow reads a cut GIF up to the cut and counts the frames it found, so without its
            # trailer byte a truncated file would pass for a shorter one.
            raise CorruptImage("truncated GIF: no trailer")
        has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
        plays = _plays(fmt, im.info.get("loop")) if frames > 1 else 0
    facts = ImageFacts(fmt, width, height, len(data), frames, im.mode, has_alpha, plays)
    return im, facts


def probe(data: bytes, limits: Limits = Limits()) -> ImageFacts:
    """Read the header only and check the limits; width and height are as stored (see target_size)."""
    return _open(data, limits)[1]


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag, from EXIF only: Pillow's getexif() falls back to an XMP
    tiff:Orientation, which browsers, libvips and sharp ignore (the same file would turn here only)."""
    if im.format == "TIFF":
        return 1  # Pillow turns a TIFF upright itself as it opens it (size) and loads it (pixels)
    try:
        raw = im.info.get("exif")
        if raw is None and "Raw profile type exif" in im.info:  # PNG text chunk (ImageMagick)
            raw = bytes.fromhex("".join(im.info["Raw profile type exif"].split("\n")[3:]))
        exif = Image.Exif()
        if raw:
            exif.load(raw)
        value = exif.get(0x0112, 1)
    except _DECODE_ERRORS:
        return 1  # a broken EXIF block is not worth failing the picture for
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _png_grey_transparency(im: Image.Image, data: bytes) -> None:
    """A 1-, 2- or 4-bit grey PNG's tRNS value on the 8-bit scale Pillow decodes its samples to (it
    scales the samples, 3 becoming 255 at 2 bits, but not the value): unscaled it matched nothing,
    and the transparent pixels came out opaque."""
    depth, colour = data[24], data[25]
    clear = im.info.get("transparency")
    if colour == 0 and depth < 8 and isinstance(clear, int) and clear < (1 << depth):
        im.info["transparency"] = clear * (255 // ((1 << depth) - 1))


def _png_rgb16_transparency(im: Image.Image, data: bytes) -> None:
    """A 16-bit RGB PNG's tRNS colour on the 8-bit scale Pillow decodes its samples to (their high
    bytes): Pillow keeps the 16-bit key, which then matched nothing, and the transparent pixels came
    out opaque. Approximate, as well as 8-bit samples allow: a pixel whose high bytes match the key's
    is transparent whatever its low bytes, so up to 255 near colours per channel go with it."""
    key = im.info.get("transparency")
    if data[24] == 16 and data[25] == 2 and isinstance(key, tuple) and len(key) == 3:
        im.info["transparency"] = tuple(v >> 8 for v in key)


def _tiff_bits(im: Image.Image) -> int:
    """A 16-bit-mode image's bits a sample: a TIFF's BitsPerSample when it says 9 to 15, else 16."""
    bits = getattr(im, "tag_v2", {}).get(258) if im.format == "TIFF" else None
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return bits if isinstance(bits, int) and 9 <= bits <= 16 else 16


# A GIF's frames as browsers show them. Pillow composites each frame onto a canvas it keeps (P for the
# first frame, then RGB, or RGBA if the first frame had a transparent index; L for a palette of
# identity greys), but browsers start from a transparent screen and clear a frame disposed "to the
# background" (disposal 2) to transparent, while Pillow filled what no frame had painted with palette
# index 0 and that disposal with the background colour, both opaque: a first frame smaller than the
# screen came out on an opaque border (found by an engine review, 2026-11-23), and a later frame's
# transparent pixels over screen nothing had painted showed that fill (a mask of the frames'
# rectangles counted them as painted), as did the rectangle of a frame disposed to the background.
# Where browsers show transparency that Pillow's canvas cannot hold, the canvas is made RGBA, with its
# transparency (a first frame's transparent index, the screen that frame leaves unpainted), disposal 2
# fills its rectangle with transparency, and Pillow's compositing goes on from there: a frame's
# transparent pixels leave what is below them, transparent or not. This reaches into the plugin's
# state (its canvas, mode and disposal fill, read by its _seek and load_end; Pillow is pinned in
# requirements.txt).


def _gif_rgba(im: ImageFile.ImageFile, painted: Image.Image | None = None) -> None:
    """Make Pillow's canvas RGBA, transparent where it has a transparent index or `painted` is 0."""
    if im.mode != "RGBA":
        canvas = Image.Image.convert(im, "RGBA")  # P or L with a transparent index: alpha from it
        if painted is not None:
            canvas.putalpha(ImageChops.darker(canvas.getchannel("A"), painted))
        im.im, im._mode = canvas.im, "RGBA"  # type: ignore[attr-defined]
        im.info.pop("transparency", None)  # now in the alpha (Pillow drops it as it leaves P, too)


def _gif_first_frame(im: ImageFile.ImageFile) -> None:
    """After the first frame's load: without a transparent index, Pillow filled the screen outside its
    rectangle with palette index 0, where browsers show it transparent."""
    extent = getattr(im, "dispose_extent", None)
    if "transparency" in im.info or extent is None:
        return
    if extent[0] > 0 or extent[1] > 0 or extent[2] < im.width or extent[3] < im.height:
        painted = Image.new("L", im.size, 0)
        painted.paste(255, extent)
        _gif_rgba(im, painted)


def _gif_before_seek(im: ImageFile.ImageFile) -> None:
    """Before the seek to the next frame, which pastes the shown frame's disposal fill: disposal 2
    (restore to the background) clears the frame's rectangle to transparent in browsers (Chrome,
    Firefox), where Pillow filled it with the background colour (without a transparent index) or lost
    the transparency on an RGB canvas. So does disposal 3 (restore what was there before) on the first
    frame, before which there was nothing (Pillow takes 4-7 as 3, and without a transparent index left
    the frame there)."""
    if im.mode == "L" and "transparency" in im.info:
        # Pillow keeps an L canvas (a palette of identity greys) for every frame, with the first frame's
        # transparent grey: a later frame's opaque pixels of that grey came out transparent.
        _gif_rgba(im)
    extent = getattr(im, "dispose_extent", None)
    if extent and (im.disposal_method == 2 or (im.disposal_method >= 3 and im.tell() == 0)):  # type: ignore[attr-defined]
        _gif_rgba(im)
        im.dispose = Image.core.fill("RGBA", (extent[2] - extent[0], extent[3] - extent[1]), (0, 0, 0, 0))  # type: ignore[attr-defined]
    # A frame's disposal is its own (a Graphic Control Extension's scope is the one image after it), but
    # Pillow sets it only from a non-zero value, so a frame whose own is 0 (unspecified: left in place)
    # took the disposal of the last frame that gave one, and one after a frame disposed to the
    # background was cleared too. Reset here, the next frame's seek sets it from that frame's own.
    im.disposal_method = 0  # type: ignore[attr-defined]


def _gif_after_seek(im: ImageFile.ImageFile) -> None:
    """After the seek, before the load: a frame placed past the canvas grows it, and Pillow grows an
    RGBA canvas as RGB (losing its alpha) for a frame without a transparent index: grown here first,
    the new part transparent (it lies off the screen, which is all the engine keeps)."""
    if im.mode == "RGBA" and im.im.size != im.size:
        grown = Image.core.fill("RGBA", im.size, (0, 0, 0, 0))
        grown.paste(im.im, (0, 0, *im.im.size))
        im.im = grown


def _working_mode(im: Image.Image) -> Image.Image:
    """A mode Pillow can resample properly: L, LA, RGB, RGBA or CMYK (palette resizes as nearest)."""
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" in im.info:
        return im.convert(mode[0] + "A" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK"):
        return im
    if mode in ("P", "PA"):
        return im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB")
    if mode in ("RGBa", "La"):
        return im.convert(mode.upper())
    if mode.startswith("I;16"):
        # 16-bit samples become 8-bit by v/256, always: a plain convert("L") clips them to white, and
        # guessing from the brightest sample would make a dark 16-bit image (all <= 255) white. A TIFF
        # of fewer bits a sample (12: scientific and medical cameras) is also I;16 in Pillow, with
        # values up to 2^bits - 1: scaled by its declared depth (v/16 at 12 bits; it came out nearly black).
        grey = im.convert("I")
        scale = 1 << (_tiff_bits(im) - 8)
        out = grey.point(lambda v: v / scale).convert("L")
        out.info.pop("transparency", None)  # a 16-bit tRNS value means nothing to an 8-bit image
        clear = im.info.get("transparency")
        if isinstance(clear, int):
            # tRNS names one 16-bit grey as transparent: alpha 0 exactly where v == clear. point() on
            # 32-bit images takes linear maps only, so |v - clear| is built from two clipped halves.
            above = grey.point(lambda v: v - clear).convert("L")
            below = grey.point(lambda v: -v + clear).convert("L")
            alpha = ImageChops.lighter(above, below).point(lambda d: 255 if d else 0)
            out = Image.merge("LA", (out, alpha))
        return out
    if mode in ("I", "F"):
        # 32-bit samples (TIFF) carry no depth: 0..255 is taken as 8-bit, anything above as 16-bit;
        # floating-point samples within 0..1 (the usual scale of float images) as 0..1.
        im = im.convert("F" if mode == "F" else "I")
        high = im.getextrema()[1]
        if isinstance(high, (int, float)) and high > 255:
            im = im.point(lambda v: v / 256)
        elif mode == "F" and isinstance(high, (int, float)) and 0 < high <= 1.0:
            im = im.point(lambda v: v * 255)
        return im.convert("L")
    if mode == "1":
        grey = im.convert("L")
        if isinstance(im.info.get("transparency"), int):  # a 1-bit grey PNG's tRNS (on 0..255)
            grey.info["transparency"] = im.info["transparency"]
            return grey.convert("LA")
        return grey
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise UnsupportedImage(f"unsupported colour mode {mode}") from e


# Transforms by (SHA-256 of the profile, mode): keyed by the profile's own bytes, the cache kept up
# to 32 of them alive in every worker child (a WebP or TIFF carries ~24 MB: ~770 MB per child, every
# later job's memory). Profiles past _ICC_CACHE_MAX_BYTES are built for their job and not kept.
_ICC_CACHE_SIZE = 32
_ICC_CACHE_MAX_BYTES = 1 << 20
_icc_cache: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_icc_cache_lock = threading.Lock()


def _to_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    if len(icc) > _ICC_CACHE_MAX_BYTES:
        return _build_srgb_transform(icc, mode)
    key = (hashlib.sha256(icc).digest(), mode)
    with _icc_cache_lock:
        if key in _icc_cache:
            _icc_cache.move_to_end(key)
            return _icc_cache[key]
    transform = _build_srgb_transform(icc, mode)
    with _icc_cache_lock:
        _icc_cache[key] = transform
        while len(_icc_cache) > _ICC_CACHE_SIZE:
            _icc_cache.popitem(last=False)
    return transform


def _build_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from the profile to sRGB; None for an unusable profile (ignored, like sharp) and
    for one that leaves the pixels as they are (an sRGB profile: the transform would be work for nothing)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        # NOCACHE: lcms' one-pixel cache is not safe when worker threads share a cached transform.
        transform = ImageCms.buildTransform(
            profile, _SRGB, mode, "RGBA" if mode == "RGBA" else "RGB", flags=ImageCms.Flags.NOCACHE,
        )
        if mode != "CMYK" and _leaves_pixels_alone(transform, mode):
            return None
        return transform
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # like sharp: an unusable embedded profile is ignored, not fatal


# A colour cube (6 levels a channel) and every grey: what a transform does to them tells an sRGB
# profile from another. Judged by its name (any description starting "sRGB"), a linear-light profile
# with sRGB's primaries ("sRGB-elle-V2-g10.icc") was skipped, and its image came out far too dark
# (found by an engine review, 2026-11-23).
_PROBE_RGB = Image.new("RGB", (216 + 256, 1))
_PROBE_RGB.putdata([(r * 51, g * 51, b * 51) for r in range(6) for g in range(6) for b in range(6)]
                   + [(v, v, v) for v in range(256)])
_PROBE_L = _PROBE_RGB.crop((216, 0, 216 + 256, 1)).convert("L")


def _leaves_pixels_alone(transform: ImageCms.ImageCmsTransform, mode: str) -> bool:
    """Whether the transform moves no probe colour by more than one level (lcms' rounding on a real sRGB
    profile: 1 at most, measured on "sRGB IEC61966-2.1")."""
    probe = _PROBE_L if mode == "L" else _PROBE_RGB.convert(mode)
    out = ImageCms.applyTransform(probe, transform)
    if out is None:
        return False
    diff = ImageChops.difference(out.convert("RGB"), probe.convert("RGB")).getextrema()
    return max(high for _, high in diff) <= 1


def _srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if icc and im.mode in ("RGB", "RGBA", "CMYK"):
        transform = _to_srgb_transform(icc, im.mode)
        if transform is not None:
            im = ImageCms.applyTransform(im, transform) or im
    elif icc and im.mode in ("L", "LA"):
        # A grey profile (Photoshop's Dot Gain 20%, Gray Gamma 2.2...) to sRGB's tone curve, kept grey:
        # the transform's R = G = B. Stripped without it, every tone came out wrong.
        transform = _to_srgb_transform(icc, "L")
        if transform is not None:
            grey = ImageCms.applyTransform(im.getchannel("L") if im.mode == "LA" else im, transform).convert("L")
            im = Image.merge("LA", (grey, im.getchannel("A"))) if im.mode == "LA" else grey
    return im.convert("RGB") if im.mode == "CMYK" else im


# --- geometry -----------------------------------------------------------------------------------

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class _Layout:
    canvas: tuple[int, int]  # output size
    size: tuple[int, int]  # size the source window is resampled to
    window: tuple[float, float]  # size of the source region used, in upright source pixels
    offset: tuple[int, int]  # where the resampled image sits on the canvas (contain)


def _layout(src_w: int, src_h: int, params: Params) -> _Layout:
    canvas = target_size(src_w, src_h, params)
    cw, ch = canvas
    if params.width and params.height and params.fit == "cover":
        scale = max(cw / src_w, ch / src_h)
        return _Layout(canvas, canvas, (min(src_w, cw / scale), min(src_h, ch / scale)), (0, 0))
    if params.width and params.height and params.fit == "contain":
        scale = min(cw / src_w, ch / src_h)
        size = (min(cw, max(1, _round_half_up(src_w * scale))), min(ch, max(1, _round_half_up(src_h * scale))))
        gx, gy = _GRAVITY_XY[params.gravity]
        return _Layout(canvas, size, (src_w, src_h), (int(gx * (cw - size[0])), int(gy * (ch - size[1]))))
    return _Layout(canvas, canvas, (src_w, src_h), (0, 0))


def _transpose_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """Where `box` of an image of `size` lands after im.transpose(method)."""
    w, h = size
    x0, y0, x1, y1 = box
    maps = {
        Image.Transpose.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y),
        Image.Transpose.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        Image.Transpose.ROTATE_180: lambda x, y: (w - x, h - y),
        Image.Transpose.ROTATE_90: lambda x, y: (y, w - x),
        Image.Transpose.ROTATE_270: lambda x, y: (h - y, x),
        Image.Transpose.TRANSPOSE: lambda x, y: (y, x),
        Image.Transpose.TRANSVERSE: lambda x, y: (h - y, w - x),
    }
    (ax, ay), (bx, by) = maps[method](x0, y0), maps[method](x1, y1)
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _entropy_position(im: Image.Image, valid: Box, window: tuple[float, float], steps: int = 10) -> tuple[float, float]:
    """Fractional (x, y) position of the crop window with the most detail (histogram entropy).

    A simple stand-in for sharp's entropy strategy: slide the window along the axis being cropped,
    scored on a small greyscale copy; ties go to the most central candidate.
    """
    vw, vh = valid[2] - valid[0], valid[3] - valid[1]
    thumb_scale = min(1.0, 256 / max(vw, vh))
    tw, th = max(1, round(vw * thumb_scale)), max(1, round(vh * thumb_scale))
    thumb = im.resize((tw, th), Image.Resampling.BILINEAR, box=valid, reducing_gap=2.0)
    thumb = thumb.convert("RGB").convert("L") if thumb.mode not in ("L", "RGB") else thumb.convert("L")
    ww, wh = max(1, round(window[0] / vw * tw)), max(1, round(window[1] / vh * th))
    slack_x, slack_y = tw - ww, th - wh
    best: tuple[float, float, float] | None = None  # (entropy, -distance from centre, fraction)
    for i in range(steps + 1):
        f = i / steps
        x, y = round(f * slack_x), round(f * slack_y)
        score = (thumb.crop((x, y, x + ww, y + wh)).entropy(), -abs(f - 0.5), f)
        if best is None or score[:2] > best[:2]:
            best = score
    f = best[2] if best else 0.5
    return (f if slack_x > 0 else 0.5), (f if slack_y > 0 else 0.5)


def _resample(im: Image.Image, size: tuple[int, int], box: Box, drafted: bool) -> Image.Image:
    if size == im.size and box == (0, 0, im.width, im.height):
        return im
    # The whole factors Image.resize will reduce() by before resampling.
    reduces = any(int((box[i + 2] - box[i]) / size[i] / REDUCING_GAP) > 1 for i in (0, 1))
    resample = Image.Resampling.LANCZOS if drafted or reduces else Image.Resampling.BICUBIC
    return im.resize(size, resample, box=box, reducing_gap=REDUCING_GAP)


# --- output -------------------------------------------------------------------------------------


def _finish(im: Image.Image, layout: _Layout, fmt: str, background: tuple[int, int, int, int] | None) -> Image.Image:
    """Pad (contain), flatten alpha if the format has none, and pick a mode the encoder takes."""
    alpha_out = fmt in _ALPHA_OUTPUTS
    if im.size != layout.canvas:
        fill = background or ((0, 0, 0, 0) if alpha_out else (255, 255, 255, 255))
        if alpha_out and (fill[3] < 255 or im.mode in ("RGBA", "LA")):
            canvas, im = Image.new("RGBA", layout.canvas, fill), im.convert("RGBA")
        elif im.mode in ("L", "LA") and fill[0] == fill[1] == fill[2]:
            canvas, im = Image.new("L", layout.canvas, fill[0]), _flatten(im, fill)
        else:
            canvas, im = Image.new("RGB", layout.canvas, fill[:3]), _flatten(im, fill).convert("RGB")
        canvas.paste(im, layout.offset)
        im = canvas
    if not alpha_out and im.mode in ("RGBA", "LA"):
        im = _flatten(im, background or (255, 255, 255, 255))
    if fmt in ("webp", "avif") and im.mode in ("L", "LA"):
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    return im


def _flatten(im: Image.Image, colour: tuple[int, int, int, int]) -> Image.Image:
    if im.mode not in ("RGBA", "LA"):
        return im
    grey = im.mode == "LA" and colour[0] == colour[1] == colour[2]
    base = Image.new("L" if grey else "RGB", im.size, colour[0] if grey else colour[:3])
    base.paste(im.convert("L" if grey else "RGB"), mask=im.getchannel("A"))
    return base


def _lowest(band: Image.Image) -> float:
    low = band.getextrema()[0]
    return low if isinstance(low, (int, float)) else 0


def _gif_frame(im: Image.Image) -> Image.Image:
    """Palette image for GIF; alpha becomes one transparent index (GIF has no partial alpha)."""
    if im.mode not in ("RGBA", "LA"):
        return im if im.mode in ("L", "P") else im.convert("RGB").quantize(256)
    rgba = im.convert("RGBA")
    clear = rgba.getchannel("A").point(lambda a: 255 if a < 128 else 0)
    frame = rgba.convert("RGB").quantize(255)
    if clear.getbbox():
        palette = (frame.getpalette() or [])[: 255 * 3]
        frame.putpalette(palette + [0] * (768 - len(palette)))
        frame.paste(255, mask=clear)
        frame.info["transparency"] = 255
    return frame


def _gif_key_colour(frames: list[Image.Image]) -> list[Image.Image]:
    """The frames with their transparent index moved to 0 and given a colour no frame's palette holds.

    With disposal 2, Pillow's GIF writer crops each later frame to where it differs from a
    'background' frame: the first frame's transparent index on the first frame's (optimised)
    palette. When the frames' palettes differ it compares colours, so opaque pixels of that entry's
    colour (black: _gif_frame pads the palette with zeros) counted as background, and opaque black
    rows or columns at a later frame's edge fell outside its rectangle and showed transparent (21 of
    40 random transparent animations). With a colour no frame uses, only transparent pixels can
    match. Index 0, not 255: the writer takes the background index from the first frame as given,
    but its palette optimisation renumbers the colours in use in order, which keeps only index 0 in
    place (the reviewer's optimize=False keeps 255 too, at 768 bytes of palette a frame: a flat
    200x120 animation of 12 frames grew 2.3x)."""
    used = {tuple(palette[i:i + 3]) for palette in (f.getpalette() or [] for f in frames)
            for i in range(0, len(palette) - 2, 3)}
    # At most 256 colours a frame and max_frames frames: a free one is found within ~77,000 steps.
    key = next(c for c in ((i >> 16, (i >> 8) & 255, i & 255) for i in range(1 << 24)) if c not in used)
    out = []
    for frame in frames:
        if frame.info.get("transparency") == 255:
            palette = frame.getpalette() or []
            palette += [0] * (768 - len(palette))
            palette[765:768] = key
            frame.putpalette(palette)
            frame = frame.remap_palette([255, *range(255)])  # index 255 becomes 0, and 0..254 1..255
        out.append(frame)
    return out


# How long a frame may show, by what each format's field holds: GIF centiseconds (16 bits), APNG
# a 16-bit fraction Pillow writes over 1000 (ms), WebP 24-bit milliseconds, AVIF 32-bit milliseconds
# (Pillow's timescale; 2**32 wrapped round to 0).
_MAX_FRAME_MS = {"gif": 655_350, "png": 65_535, "webp": 16_777_215, "avif": 2**32 - 1}
_MAX_PLAYS = 65_535  # GIF's loop count and the others' play count are 16-bit in practice


def _gif_merge_repeats(frames: list[Image.Image], durations: list[int]) -> tuple[list[Image.Image], list[int]]:
    """Consecutive frames that look the same (after the resize and the palette) as one frame, shown
    for their summed duration. Pillow's GIF writer merges them itself, but adds the durations after
    they were clamped to the 16-bit field: two identical 400 s frames overflowed it ('int too big to
    convert', a 422 for a valid input). Merged here, the sum is clamped like any other delay; frames
    left unmerged here differ in some pixel, so the writer merges none (it compares palette indices
    or, when the palettes differ, RGBA as here)."""
    kept, kept_durations, previous = [frames[0]], [max(0, durations[0])], frames[0].convert("RGBA")
    for frame, duration in zip(frames[1:], durations[1:], strict=True):
        pixels = frame.convert("RGBA")  # as much memory as the writer's own comparison takes
        if not ImageChops.difference(pixels, previous).getbbox(alpha_only=False):
            kept_durations[-1] += max(0, duration)
            continue
        kept.append(frame)
        kept_durations.append(max(0, duration))
        previous = pixels
    return kept, kept_durations


def _gif_delay(ms: int) -> int:
    """A frame's duration as a GIF can hold it: centiseconds, rounded (Pillow truncates: 33 ms became
    30), and at least 20 ms, since browsers play 0 and 10 ms as 100 ms (a 16 ms frame of a 60 fps WebP
    played six times too slowly). 0 stays 0, as the input asked (browsers' 100 ms either way)."""
    if ms <= 0:
        return 0
    return min(max(20, (ms + 5) // 10 * 10), _MAX_FRAME_MS["gif"])


def _avif_delay(ms: int) -> int:
    """A frame's duration in an AVIF: a frame of at most 10 ms (0 included) as 100 ms, which is how
    browsers play such a frame of the GIF or WebP it came from (an AVIF's frame of 0 is written as 1 ms
    and played as such: a GIF of 0-delay frames, common among old ones, raced through)."""
    return 100 if ms <= 10 else min(ms, _MAX_FRAME_MS["avif"])


def _plays(input_format: str, loop: Any) -> int:
    """How many times the input animation plays (0: forever). Pillow's `loop` is a GIF's NETSCAPE
    repeat count (N repeats = N + 1 plays; no block = once) but WebP's and APNG's play count; AVIF's
    is not exposed (its edit list repeats forever, as animated AVIF is written)."""
    if input_format == "avif":
        return 0
    if input_format == "gif":
        return 1 if not isinstance(loop, int) else 0 if loop == 0 else loop + 1
    return loop if isinstance(loop, int) and loop >= 0 else 0


def _encode(
    frames: list[Image.Image], fmt: str, quality: int | None, durations: list[int], plays: int,
) -> tuple[bytes, Image.Image, int]:
    """Encoded bytes, the first frame as it was handed to the encoder, and how many frames were written."""
    options = dict(ENCODER_DEFAULTS[fmt])
    if quality is not None and fmt in _LOSSY:
        options["quality"] = quality
    if fmt == "gif":
        frames = [_gif_frame(f) for f in frames]
        if len(frames) > 1:
            frames, durations = _gif_merge_repeats(frames, durations)
        if len(frames) > 1 and "transparency" in frames[0].info:
            frames = _gif_key_colour(frames)
    for frame in frames:
        # Resampled images inherit the source's info, and some encoders write comment, icc_profile
        # or exif straight from it: start clean so no metadata reaches the output.
        frame.info = {"transparency": frame.info["transparency"]} if "transparency" in frame.info else {}
    if len(frames) > 1:
        durations = [_gif_delay(d) if fmt == "gif" else _avif_delay(d) if fmt == "avif"
                     else min(max(0, d), _MAX_FRAME_MS[fmt]) for d in durations]
        plays = min(plays, _MAX_PLAYS)
        options.update(save_all=True, append_images=frames[1:], duration=durations)
        if fmt == "gif":
            options["disposal"] = 2  # each frame is complete; clear before drawing the next one
            if plays != 1:  # no loop block: once; else repeats = plays - 1 (0 stays: forever)
                options["loop"] = max(0, plays - 1)
        elif fmt != "avif":  # AVIF: written only for an animation that plays forever (_moves), as it repeats
            options["loop"] = plays
    buf = io.BytesIO()
    frames[0].save(buf, fmt.upper(), **options)
    data = buf.getvalue()
    if fmt == "webp" and len(frames) > 1 and frames[0].mode == "RGBA" and data[12:16] == b"VP8X":
        # libwebp trims transparent borders off animation frames and then, seeing only opaque
        # pixels, leaves VP8X's alpha flag clear, so decoders treat the uncovered (transparent)
        # canvas as opaque. The spec says the flag is set if any frame has transparency: set it.
        data = data[:20] + bytes([data[20] | 0x10]) + data[21:]
    written = len(frames)
    if written > 1 and fmt in ("png", "webp"):
        # Their writers merge frames that come out the same (Pillow's APNG writer: identical pixels;
        # libwebp: no changed rectangle, within its lossy tolerance) into one, longer frame: the
        # output's frame count, which output pixels and the bill count, is read back from the file's
        # chunks (no decoding). It said the frames handed over (3 for 2 written).
        with Image.open(io.BytesIO(data)) as out:
            written = int(getattr(out, "n_frames", 1))
    return data, frames[0], written


# --- the pipeline -------------------------------------------------------------------------------


def _output_refusal(layout: _Layout, count: int, fmt: str, limits: Limits) -> str | None:
    """Why this output cannot be made (too many pixels in all, or a side its encoder cannot write)."""
    width, height = layout.canvas
    if width * height * count > limits.max_output_pixels:
        return (f"output would be {width}x{height}" + (f" x {count} frames" if count > 1 else "")
                + f"; the limit is {limits.max_output_pixels} pixels")
    if max(width, height) > _ENCODER_MAX_SIDE[fmt]:
        return f"{'WebP' if fmt == 'webp' else fmt.upper()} images can be at most {_ENCODER_MAX_SIDE[fmt]} pixels on a side"
    return None


def output_check(params: Params, facts: ImageFacts, limits: Limits = Limits()) -> None:
    """Raise OutputTooLarge when the output cannot be made whichever way up the image turns out to be
    (its EXIF orientation is read only as it decodes): the API refuses such a request from the probe,
    before it makes a job (which failed later, with the same error, after a trip through the queue)."""
    fmt = output_format(params, facts)
    count = facts.frames if _moves(fmt, facts) else 1
    refusals = [_output_refusal(_layout(w, h, params), count, fmt, limits)
                for w, h in ((facts.width, facts.height), (facts.height, facts.width))]
    if all(refusals):
        raise OutputTooLarge(refusals[0])  # type: ignore[arg-type]


def resize(data: bytes, params: Params, limits: Limits = Limits()) -> Result:
    """Decode, orient, fit, convert to sRGB, strip metadata and encode one image."""
    started = time.thread_time()
    validate(params)
    im, facts = _open(data, limits)
    fmt = output_format(params, facts)
    animate = _moves(fmt, facts)
    background = parse_background(params.background) if params.background else None
    with _decoding():
        count = facts.frames if animate else 1
        if facts.format == "png":
            # A PNG's eXIf chunk may follow the pixels, and Pillow reads it only by decoding: refuse
            # an output too large either way up before paying for that decode.
            output_check(params, facts, limits)
            im.load()
            if _png_last_row_blank(im, data) and (short := _png_data_short(data)):
                raise CorruptImage(short)
            _png_rgb16_transparency(im, data)  # once: an APNG's frames share this info dict
        if facts.format == "tiff":
            # Pillow turns a TIFF upright on load by getexif(), which falls back to an XMP orientation,
            # while its size at open followed the EXIF tag alone: the picture turned under a canvas of
            # the other shape (half of it black). XMP orientation is ignored here, as for every format.
            im.info.pop("xmp", None)
        orientation = _orientation(im)
        upright = (facts.height, facts.width) if orientation >= 5 else (facts.width, facts.height)
        layout = _layout(*upright, params)
        if refusal := _output_refusal(layout, count, fmt, limits):
            raise OutputTooLarge(refusal)

        draft = 1
        if facts.format == "jpeg":
            shrink = min(layout.window[0] / layout.size[0], layout.window[1] / layout.size[1])
            draft = next((s for s in (8, 4, 2) if s * JPEG_DRAFT_HEADROOM <= shrink), 1)
            if draft > 1:
                im.draft(None, (facts.width // draft, facts.height // draft))
                if im.size != (math.ceil(facts.width / draft), math.ceil(facts.height / draft)):
                    draft = 1  # the plugin declined (e.g. multi-tile file): decode in full

        frames: list[Image.Image] = []
        durations: list[int] = []
        position: tuple[float, float] | None = None
        icc: Any = None
        plain_cmyk = False
        decoded = 0
        # An APNG's default image (IDAT without an fcTL) is the still fallback, not an animation frame.
        start = 1 if animate and facts.format == "png" and im.info.get("default_image") else 0
        for index in range(start, count):
            if index:
                if facts.format == "gif":
                    _gif_before_seek(im)
                im.seek(index)
                if facts.format == "gif":
                    _gif_after_seek(im)
                if im.size[0] * im.size[1] > limits.max_pixels:
                    raise ImageTooLarge(f"frame {index} is {im.size[0]}x{im.size[1]} pixels")
            # A GIF frame placed past the logical screen grows the canvas Pillow decodes into: the
            # header's frames x width x height checked in _open does not bound what is decoded.
            decoded += im.size[0] * im.size[1]
            if count > 1 and decoded > limits.max_animation_pixels:
                raise ImageTooLarge(f"the animation's frames decode to more than {limits.max_animation_pixels} "
                                    f"pixels in all (frame {index} is {im.size[0]}x{im.size[1]})")
            kept = _apng_frame_row(im, data) if index and facts.format == "png" else None
            im.load()
            if kept is not None and _apng_frame_row(im, data) == kept and (short := _png_data_short(data, index)):
                raise CorruptImage(short)
            if facts.format == "gif" and index == 0:
                _gif_first_frame(im)
            if facts.format == "png":
                _png_grey_transparency(im, data)
            if index == start:
                icc = im.info.get("icc_profile")
                # Pillow reads every CMYK JPEG as Adobe's inverted CMYK; only files with Adobe's APP14
                # marker are (libvips, hence sharp, inverts just those). Without it red came out black.
                plain_cmyk = im.mode == "CMYK" and facts.format == "jpeg" and "adobe" not in im.info
            durations.append(int(im.info.get("duration") or 0))
            frame = _working_mode(im)
            if facts.format == "gif" and frame.mode == "RGBA" and _lowest(frame.getchannel("A")) == 255:
                frame = frame.convert("RGB")  # a canvas made RGBA (_gif_rgba) and painted all over: resampled as RGB, ~20% faster
            if frame is im and animate:
                frame = im.copy()  # the next seek() overwrites im in place
            if frame.size != (math.ceil(facts.width / draft), math.ceil(facts.height / draft)):
                # GIF frames may grow the canvas; browsers clip them to the logical screen.
                frame = frame.crop((0, 0, facts.width, facts.height))
            # A DCT-scaled decode holds width/draft real pixels: its last column and row are partial.
            valid: Box = (0, 0, facts.width / draft, facts.height / draft)
            if orientation in _TRANSPOSE:
                valid = _transpose_box(valid, frame.size, _TRANSPOSE[orientation])
                frame = frame.transpose(_TRANSPOSE[orientation])
            box = valid
            if layout.window != upright:  # cover: place the crop window by gravity
                scale = (valid[2] - valid[0]) / upright[0]
                window = (layout.window[0] * scale, layout.window[1] * scale)
                slack = (valid[2] - valid[0] - window[0], valid[3] - valid[1] - window[1])
                if position is None:
                    position = (_entropy_position(frame, valid, window) if params.gravity == "entropy"
                                else _GRAVITY_XY[params.gravity])
                x0, y0 = valid[0] + position[0] * slack[0], valid[1] + position[1] * slack[1]
                box = (x0, y0, x0 + window[0], y0 + window[1])
            frame = _resample(frame, layout.size, box, draft > 1)
            if plain_cmyk:  # after the resample, which commutes with it: on the fewest pixels
                frame = ImageChops.invert(frame)
            frame = _srgb(frame, icc if isinstance(icc, bytes) else None)
            frames.append(_finish(frame, layout, fmt, background))
        if animate:
            # One mode for every frame; RGBA only if some frame really is transparent somewhere.
            clear = any(f.mode in ("RGBA", "LA") and _lowest(f.getchannel("A")) < 255 for f in frames)
            frames = [f.convert("RGBA" if clear else "RGB") for f in frames]

    try:
        out, first, written = _encode(frames, fmt, params.quality, durations, facts.plays)
    except _DECODE_ERRORS as e:  # an encoder's refusal (a value its format cannot hold) is a 422, not a 500
        raise CorruptImage(f"could not encode the image as {fmt}: {e}") from e
    if len(out) > limits.max_output_bytes:
        raise OutputTooLarge(f"the {fmt} image is {len(out) / 1e6:.1f} MB encoded; the limit is "
                             f"{limits.max_output_bytes / 1e6:.1f} MB (ask for fewer pixels, or a more compact format)")
    has_alpha = first.mode in _ALPHA_MODES or "transparency" in first.info
    output = ImageFacts(fmt, first.width, first.height, len(out), written, first.mode, has_alpha)
    return Result(out, CONTENT_TYPES[fmt], facts, output, time.thread_time() - started)
