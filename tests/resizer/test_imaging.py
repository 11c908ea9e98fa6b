"""Tests of the image engine alone: plain pytest, no Django, no database.

Run: .venv/bin/python -m pytest tests/resizer/test_imaging.py
 or, with no Django at all: .venv/bin/python -m pytest tests/resizer/test_imaging.py -p no:django --noconftest
"""
from __future__ import annotations

import io
import math
import random
import re
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, Image, ImageChops, ImageDraw, ImageFile, ImageStat, JpegImagePlugin

from resizer.imaging import (
    FITS,
    FORMATS,
    CorruptImage,
    ImageError,
    ImageFacts,
    ImageTooLarge,
    InputTooLarge,
    InvalidParameters,
    Limits,
    OutputTooLarge,
    Params,
    UnsupportedImage,
    output_format,
    probe,
    resize,
    target_size,
    validate,
)
from resizer import imaging
from resizer.imaging import _layout  # the contain layout's inner size

CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def encode(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def mean(im: Image.Image, mode: str = "RGB") -> list[float]:
    return ImageStat.Stat(im.convert(mode)).mean


def close(a: list[float], b: list[float], tolerance: float) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims width x height, followed by a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 30)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gif_with_frames(count: int) -> bytes:
    """A valid 1x1 GIF with `count` frames, written by hand (Pillow would merge identical frames)."""
    head = b"GIF89a" + struct.pack("<HH", 1, 1) + bytes([0x80, 0, 0]) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00"
    frame += b"\x02\x02\x44\x01\x00"
    return head + frame * count + b"\x3b"


@pytest.fixture(autouse=True)
def _strict_loading():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- target_size: fit semantics ----------------------------------------------------------------

@pytest.mark.parametrize(
    ("src", "params", "expected"),
    [
        ((1280, 960), Params(width=800, height=800, fit="inside"), (800, 600)),
        ((1280, 960), Params(width=800, height=800, fit="outside"), (1067, 800)),
        ((1280, 960), Params(width=800, height=800, fit="cover"), (800, 800)),
        ((1280, 960), Params(width=800, height=800, fit="contain"), (800, 800)),
        ((1280, 960), Params(width=300, height=100, fit="fill"), (300, 100)),
        ((1280, 960), Params(width=640), (640, 480)),
        ((1280, 960), Params(height=480, fit="cover"), (640, 480)),  # one side: the box follows the aspect
        ((1280, 960), Params(width=640, fit="fill"), (640, 960)),  # sharp: fill leaves the other side alone
        ((100, 50), Params(width=400, height=400, fit="inside"), (100, 50)),  # no enlargement by default
        ((100, 50), Params(width=400, height=400, fit="outside"), (100, 50)),
        ((100, 50), Params(width=400, height=400, fit="inside", enlarge=True), (400, 200)),
        ((100, 50), Params(width=400, height=400, fit="outside", enlarge=True), (800, 400)),
        ((100, 50), Params(width=400, height=400, fit="cover"), (400, 400)),  # cover/contain/fill: always the box
        ((20000, 1), Params(width=100), (100, 1)),  # never 0
        ((1, 20000), Params(width=100), (1, 20000)),  # would be 100x2000000: not enlarged
        ((1, 20000), Params(width=100, enlarge=True), (100, 2_000_000)),
    ],
)
def test_target_size_table(src, params, expected):
    assert target_size(*src, params) == expected


@pytest.mark.parametrize("src,params,expected", [
    ((1837, 1350), Params(height=675), (919, 675)),  # 918.5: Python's round() gave 918
    ((640, 425), Params(width=320), (320, 213)),      # 212.5
    ((4, 5), Params(width=2), (2, 3)),                # 2.5
    ((640, 425), Params(width=320, height=320, fit="contain"), (320, 320)),
])
def test_a_derived_side_at_one_half_rounds_up_as_in_sharp(src, params, expected):
    assert target_size(*src, params) == expected
    if params.fit == "contain":
        assert _layout(*src, params).size == (320, 213)


dims = st.integers(min_value=1, max_value=20_000)
box_side = st.integers(min_value=1, max_value=8192)


@settings(max_examples=400, deadline=None)
@given(sw=dims, sh=dims, w=st.none() | box_side, h=st.none() | box_side, fit=st.sampled_from(FITS),
       enlarge=st.booleans())
def test_target_size_follows_the_definitions(sw, sh, w, h, fit, enlarge):
    assume(w is not None or h is not None)
    ow, oh = target_size(sw, sh, Params(width=w, height=h, fit=fit, enlarge=enlarge))
    assert ow >= 1 and oh >= 1
    if fit == "fill":
        assert (ow, oh) == (w or sw, h or sh)
        return
    if w and h and fit in ("cover", "contain"):
        assert (ow, oh) == (w, h)
        return
    # Aspect-keeping fits: find the scale the definition asks for.
    if w and h:
        scale = min(w / sw, h / sh) if fit == "inside" else max(w / sw, h / sh)
    else:
        scale = w / sw if w else h / sh
    if fit in ("inside", "outside") and not enlarge and scale > 1:
        assert (ow, oh) == (sw, sh)
        return
    # Each side is the scaled source side, rounded half up as libvips does (sharp's sizes), and at
    # least 1; the side that set the scale is exact.
    for out, src in ((ow, sw), (oh, sh)):
        ideal = src * scale
        assert out == max(1, math.floor(ideal + 0.5))
    if w and h and fit == "inside":
        assert ow <= w and oh <= h and (ow == w or oh == h)
    if w and h and fit == "outside":
        assert ow >= w and oh >= h and (ow == w or oh == h)
    if not (w and h):
        assert ow == w if w else oh == h
    if fit in ("inside", "outside") and not enlarge:
        assert ow <= sw and oh <= sh


# --- real resizes: fits, gravity ---------------------------------------------------------------

@pytest.mark.parametrize("fit", FITS)
def test_real_resize_matches_target_size(fit):
    params = Params(width=300, height=200, fit=fit, format="png")
    result = resize(corpus("photo-256k-0.jpg"), params)
    out = decode(result.data)
    assert out.size == target_size(1280, 960, params) == (result.output.width, result.output.height)
    assert result.content_type == "image/png" and out.format == "PNG"
    assert result.cpu_seconds > 0


def test_contain_pads_transparent_for_png_and_white_for_jpeg():
    wide = encode(Image.new("RGB", (200, 100), (200, 30, 30)), "PNG")
    png = decode(resize(wide, Params(width=100, height=100, fit="contain", format="png")).data).convert("RGBA")
    assert png.size == (100, 100)
    assert png.getpixel((50, 2))[3] == 0 and png.getpixel((50, 97))[3] == 0  # centred: bands above and below
    assert png.getpixel((50, 50)) == (200, 30, 30, 255)
    jpg = decode(resize(wide, Params(width=100, height=100, fit="contain", format="jpeg")).data)
    assert close(list(jpg.getpixel((50, 2))), [255, 255, 255], 3)
    blue = decode(resize(wide, Params(width=100, height=100, fit="contain", format="png", background="#0000ff")).data)
    assert blue.convert("RGB").getpixel((50, 2)) == (0, 0, 255)
    # Like sharp, gravity also places a contained image: north puts the band at the top.
    top = decode(resize(wide, Params(width=100, height=100, fit="contain", gravity="north", format="png")).data)
    assert top.convert("RGBA").getpixel((50, 2))[3] == 255 and top.convert("RGBA").getpixel((50, 97))[3] == 0


def halves(size: tuple[int, int], first: tuple[int, int, int], second: tuple[int, int, int], vertical: bool) -> bytes:
    im = Image.new("RGB", size, first)
    w, h = size
    ImageDraw.Draw(im).rectangle((0, h // 2, w, h) if vertical else (w // 2, 0, w, h), fill=second)
    return encode(im, "PNG")


@pytest.mark.parametrize(
    ("gravity", "expected"),
    [("north", (255, 0, 0)), ("south", (0, 0, 255)), ("center", None), ("northwest", (255, 0, 0))],
)
def test_cover_crops_by_gravity(gravity, expected):
    tall = halves((100, 300), (255, 0, 0), (0, 0, 255), vertical=True)  # red on top, blue below
    out = decode(resize(tall, Params(width=100, height=100, fit="cover", gravity=gravity, format="png")).data)
    assert out.size == (100, 100)
    if expected:
        assert close(mean(out), list(expected), 2)
    else:  # centre: half red, half blue
        assert close(mean(out), [127.5, 0, 127.5], 3)


def test_cover_entropy_picks_the_detailed_side():
    rng = random.Random(7)
    im = Image.new("L", (400, 100), 128)
    noise = Image.frombytes("L", (100, 100), bytes(rng.randrange(256) for _ in range(100 * 100)))
    im.paste(noise, (300, 0))  # all the detail at the right edge
    out = decode(resize(encode(im, "PNG"), Params(width=100, height=100, fit="cover", gravity="entropy")).data)
    flat = decode(resize(encode(im, "PNG"), Params(width=100, height=100, fit="cover", gravity="center")).data)
    assert ImageStat.Stat(out).stddev[0] > 40  # the noise was kept
    assert ImageStat.Stat(flat).stddev[0] < 1  # whereas the middle is flat


def test_sliver_images():
    tall = encode(Image.new("RGB", (1, 20000), (9, 9, 9)), "PNG")
    assert resize(tall, Params(width=100)).output.width == 1  # not enlarged: stays 1x20000
    assert (resize(tall, Params(width=100)).output.height) == 20000
    with pytest.raises(OutputTooLarge):  # 100 x 2,000,000 when enlarging
        resize(tall, Params(width=100, enlarge=True))
    with pytest.raises(OutputTooLarge):  # WebP cannot hold 20000 pixels on a side
        resize(tall, Params(width=100, format="webp"))
    with pytest.raises(OutputTooLarge, match="AVIF images can be at most 32768 pixels"):
        # 10 x 40000: libavif encoded it, and no decoder (libavif's limit is 32768) could open it
        resize(encode(Image.new("RGB", (1, 4000), (9, 9, 9)), "PNG"), Params(width=10, enlarge=True, format="avif"))
    wide = encode(Image.new("RGB", (20000, 1), (9, 9, 9)), "PNG")
    result = resize(wide, Params(width=100))
    assert (result.output.width, result.output.height) == (100, 1)
    assert decode(result.data).size == (100, 1)


def test_an_output_past_the_byte_limit_is_refused_not_kept():
    """The pixel limit bounds a decode, not an encoded file: 50 MP of noise came out as a 117 MB PNG
    (58 MB as JPEG at quality 100), held in the worker, kept in staging and served whole (found by the
    security review). Past `max_output_bytes` it is output_too_large."""
    noise = Image.frombytes("RGB", (300, 300), random.Random(7).randbytes(300 * 300 * 3))
    data = encode(noise, "PNG")
    made = resize(data, Params(width=300, format="png"))
    assert len(made.data) > 200_000  # noise does not compress
    with pytest.raises(OutputTooLarge, match="MB encoded"):
        resize(data, Params(width=300, format="png"), Limits(max_output_bytes=200_000))
    assert len(resize(data, Params(width=300, format="jpeg", quality=60), Limits(max_output_bytes=200_000)).data) < 200_000


# --- formats -----------------------------------------------------------------------------------

def small_photo() -> Image.Image:
    return decode(corpus("chelsea.jpg")).resize((120, 80))


@pytest.mark.parametrize("source", ["JPEG", "PNG", "WEBP", "AVIF", "GIF", "TIFF", "BMP"])
@pytest.mark.parametrize("target", FORMATS)
def test_every_input_format_to_every_output_format(source, target):
    data = encode(small_photo(), source)
    result = resize(data, Params(width=60, format=target))
    out = decode(result.data)
    assert out.format.lower() == target and out.size == (60, 40)
    assert result.input.format == source.lower() and result.output.format == target
    # The picture survives the trip (GIF's palette and lossy codecs allow some slack).
    assert close(mean(out), mean(small_photo().resize((60, 40))), 12)


def test_format_none_keeps_the_input_format_and_picks_one_for_tiff_and_bmp():
    assert decode(resize(encode(small_photo(), "WEBP"), Params(width=30)).data).format == "WEBP"
    assert decode(resize(encode(small_photo(), "TIFF"), Params(width=30)).data).format == "JPEG"
    assert decode(resize(encode(small_photo().convert("RGBA"), "TIFF"), Params(width=30)).data).format == "PNG"
    assert decode(resize(encode(small_photo(), "BMP"), Params(width=30)).data).format == "JPEG"


def facts(fmt: str, frames: int = 1, alpha: bool = False, plays: int = 0) -> ImageFacts:
    return ImageFacts(format=fmt, width=10, height=10, bytes=100, frames=frames, has_alpha=alpha, plays=plays)


@pytest.mark.parametrize(
    ("params", "input_facts", "expected"),
    [
        (Params(width=1, format="auto", accept=("avif", "webp")), facts("jpeg"), "avif"),
        (Params(width=1, format="auto", accept=("webp",)), facts("png", alpha=True), "webp"),
        (Params(width=1, format="auto", accept=("image/webp", "image/avif")), facts("jpeg"), "avif"),
        (Params(width=1, format="auto"), facts("jpeg"), "jpeg"),
        (Params(width=1, format="auto"), facts("tiff", alpha=True), "png"),
        (Params(width=1, format="auto"), facts("bmp"), "jpeg"),
        # An animation that plays forever moves as AVIF too, which comes first as for a still; one that
        # plays a set number of times would be a still AVIF (its play count cannot be written): WebP, or
        # the input's format.
        (Params(width=1, format="auto", accept=("avif", "webp")), facts("gif", frames=12), "avif"),
        (Params(width=1, format="auto", accept=("avif",)), facts("gif", frames=12), "avif"),
        (Params(width=1, format="auto", accept=("avif", "webp")), facts("gif", frames=12, plays=1), "webp"),
        (Params(width=1, format="auto", accept=("avif",)), facts("gif", frames=12, plays=3), "gif"),  # keep the motion
        (Params(width=1, format="auto", accept=("avif",)), facts("webp", frames=2, plays=2), "webp"),
        (Params(width=1, format="auto", accept=("avif",)), facts("gif"), "avif"),  # a still GIF is a still
        (Params(width=1), facts("gif", frames=3), "gif"),
        (Params(width=1, format="jpg"), facts("png"), "jpeg"),
        (Params(width=1, format="webp", accept=("avif",)), facts("png"), "webp"),
        # A client that names the types it takes, and not the input's: one of those (a WebP came back
        # as WebP to a client taking only JPEG and PNG).
        (Params(width=1, format="auto", accept=("jpeg", "png")), facts("webp"), "jpeg"),
        (Params(width=1, format="auto", accept=("jpeg", "png")), facts("webp", alpha=True), "png"),
        (Params(width=1, format="auto", accept=("jpeg", "*")), facts("webp"), "webp"),  # any image will do
        (Params(width=1, format="auto", accept=("png",)), facts("jpeg"), "png"),
        (Params(width=1, format="auto", accept=("jpeg", "png")), facts("webp", frames=5), "png"),  # APNG: it moves
        # An animated AVIF (it plays forever) stays one: it moves.
        (Params(width=1, format="auto"), facts("avif", frames=8), "avif"),
        (Params(width=1, format="auto", accept=("*",)), facts("avif", frames=8), "avif"),
        (Params(width=1, format="auto", accept=("webp", "gif")), facts("avif", frames=8), "webp"),
        (Params(width=1, format="auto", accept=("gif",)), facts("avif", frames=8), "gif"),
        (Params(width=1), facts("avif", frames=8), "avif"),
        # A format the client refuses (q=0, `-name`) is never picked, a wildcard notwithstanding (WebP
        # came back to `image/webp;q=0, */*` for an animated input: found by the diff review).
        (Params(width=1, format="auto", accept=("*", "-webp")), facts("gif", frames=8, plays=1), "gif"),
        (Params(width=1, format="auto", accept=("*", "-avif")), facts("avif", frames=8), "gif"),
        (Params(width=1, format="auto", accept=("*", "-webp")), facts("webp"), "jpeg"),
        (Params(width=1, format="auto", accept=("*", "-webp")), facts("webp", alpha=True), "png"),
        (Params(width=1, format="auto", accept=("*", "-jpeg")), facts("jpeg"), "png"),
        # WebP rated below AVIF (`~webp`): a still gets AVIF, and so does an animation that plays
        # forever; one that plays a set number of times WebP (it came back a still AVIF).
        (Params(width=1, format="auto", accept=("avif", "~webp")), facts("jpeg"), "avif"),
        (Params(width=1, format="auto", accept=("avif", "~webp")), facts("gif", frames=4), "avif"),
        (Params(width=1, format="auto", accept=("avif", "~webp")), facts("gif", frames=4, plays=1), "webp"),
        (Params(width=1, format="auto", accept=("avif", "~webp")), facts("avif", frames=4), "avif"),
    ],
)
def test_output_format(params, input_facts, expected):
    validate(params)
    assert output_format(params, input_facts) == expected


def test_alpha_is_flattened_onto_white_or_the_background_for_jpeg_and_kept_for_png():
    im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((0, 0, 19, 39), fill=(0, 200, 0, 255))
    data = encode(im, "PNG")
    white = decode(resize(data, Params(width=40, format="jpeg")).data)
    assert white.mode == "RGB"
    assert close(list(white.getpixel((35, 20))), [255, 255, 255], 3)
    assert close(list(white.getpixel((5, 20))), [0, 200, 0], 6)
    red = decode(resize(data, Params(width=40, format="jpeg", background="ff0000")).data)
    assert close(list(red.getpixel((35, 20))), [255, 0, 0], 6)
    for fmt in ("png", "webp", "avif"):
        kept = decode(resize(data, Params(width=40, format=fmt)).data).convert("RGBA")
        assert kept.getpixel((35, 20))[3] < 10 and kept.getpixel((5, 20))[3] > 245
    gif = decode(resize(data, Params(width=40, format="gif")).data)
    assert "transparency" in gif.info and gif.convert("RGBA").getpixel((35, 20))[3] == 0


# --- animation ---------------------------------------------------------------------------------

def frames_of(data: bytes) -> list[Image.Image]:
    im = Image.open(io.BytesIO(data))
    out = []
    for i in range(getattr(im, "n_frames", 1)):
        im.seek(i)
        out.append(im.convert("RGB"))
    return out


@pytest.mark.parametrize("fmt", ["gif", "webp", "png"])
def test_animation_is_kept_for_gif_webp_and_apng(fmt):
    source = corpus("chelsea-animated.gif")
    src = Image.open(io.BytesIO(source))
    durations = []
    for i in range(src.n_frames):
        src.seek(i)
        durations.append(src.info["duration"])
    result = resize(source, Params(width=112, format=fmt))
    out = Image.open(io.BytesIO(result.data))
    assert out.n_frames == 12 == result.output.frames
    assert out.size == (112, 75)
    out_durations = []
    for i in range(out.n_frames):
        out.seek(i)
        out.load()  # WebP fills in the duration when the frame is decoded
        out_durations.append(out.info["duration"])
    assert out_durations == durations
    assert out.info.get("loop") == src.info.get("loop")
    # Frame by frame, each output frame is its own input frame, resized.
    for mine, theirs in zip(frames_of(result.data), frames_of(source), strict=True):
        expected = theirs.resize((112, 75), Image.Resampling.LANCZOS)
        assert ImageStat.Stat(ImageChops.difference(mine, expected)).mean[0] < 12


def _gif_played_once(gif: bytes) -> bytes:
    """The GIF without its NETSCAPE block (its loop count): it plays once."""
    start = gif.index(b"!\xff\x0bNETSCAPE2.0")
    return gif[:start] + gif[start + 19:]  # the block: 3 + 11 bytes, then 03 01 <count, 2 bytes> 00


def _two_frames(fmt: str, **options) -> bytes:
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **options)


def _plays_of(data: bytes) -> int:
    """How many times an animation plays (0: forever), whatever its format's way of saying it."""
    im = Image.open(io.BytesIO(data))
    loop = im.info.get("loop")
    if im.format == "GIF":
        return 1 if loop is None else 0 if loop == 0 else loop + 1
    return loop


@pytest.mark.parametrize("source,plays", [
    (lambda: _two_frames("GIF", duration=50, loop=2), 3),   # a GIF's loop 2 is two repeats: three plays
    (lambda: _two_frames("GIF", duration=50), 1),           # no NETSCAPE block: once
    (lambda: _two_frames("GIF", duration=50, loop=0), 0),   # forever
    (lambda: _two_frames("WEBP", duration=50, loop=1), 1),  # WebP's loop is the play count
    (lambda: _two_frames("PNG", duration=50, loop=4), 4),   # and APNG's
    (lambda: _two_frames("AVIF", duration=50), 0),          # AVIF's repeats forever (not exposed by Pillow)
])
@pytest.mark.parametrize("fmt", ["gif", "webp", "png"])
def test_an_animation_plays_as_many_times_in_every_format(source, plays, fmt):
    """Pillow's `loop` means repeats for GIF but plays for WebP and APNG: copied as is, a GIF that
    plays 3 times played 2 as WebP, a WebP that plays once played twice as GIF, and an animated AVIF
    (forever) played once."""
    assert _plays_of(resize(source(), Params(width=10, format=fmt)).data) == plays


@pytest.mark.parametrize("fmt", ["gif", "webp", "png"])
def test_durations_and_play_counts_past_a_format_s_fields_are_clamped_not_500(fmt):
    """A 700 s frame does not fit a GIF's 16-bit centiseconds, nor 70,000 plays a 16-bit count:
    Pillow raised OverflowError (or libwebp a RuntimeError), which escaped as a 500."""
    long_frame = _two_frames("WEBP", duration=[700_000, 50], loop=0)
    out = Image.open(io.BytesIO(resize(long_frame, Params(width=10, format=fmt)).data))
    out.load()
    assert out.n_frames == 2 and out.info["duration"] == {"gif": 655_350, "png": 65_535, "webp": 700_000}[fmt]
    many_plays = _two_frames("PNG", duration=50, loop=70_000)
    assert _plays_of(resize(many_plays, Params(width=10, format=fmt)).data) == 65_535


def _delays(data: bytes) -> list[int]:
    """Each frame's duration (ms) as the file says it."""
    out = Image.open(io.BytesIO(data))
    delays = []
    for i in range(getattr(out, "n_frames", 1)):
        out.seek(i)
        out.load()  # AVIF's duration is read as the frame decodes
        delays.append(out.info.get("duration"))
    return delays


@pytest.mark.parametrize("given,written", [(0, 0), (5, 20), (10, 20), (16, 20), (24, 20), (25, 30), (33, 30),
                                           (35, 40), (1_000_000, 655_350)])
def test_gif_frame_delays_are_rounded_and_never_below_what_browsers_play(given, written):
    """GIF delays are centiseconds: Pillow truncated (33 ms became 30) and a 16 ms frame became 10 ms,
    which browsers play at 100 ms (six times too slow). 0 stays 0."""
    frames = [Image.new("RGB", (20, 10), (i * 80, 0, 0)) for i in range(3)]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=[given, 100, given],
                  loop=0, lossless=True)
    assert _delays(resize(webp, Params(width=20, format="gif")).data) == [written, 100, written]


@pytest.mark.parametrize("durations,written", [([400_000, 400_000, 100], [655_350, 100]), ([16, 16, 100], [30, 100])])
def test_gif_frames_made_identical_by_the_resize_are_merged_within_the_delay_field(durations, written):
    """Frames that differ only where cover crops become identical; Pillow's GIF writer merged them and
    added their (each clamped) delays, past the 16-bit centiseconds: 'int too big to convert', a 422."""
    red = Image.new("RGB", (40, 20), "red")
    dotted = red.copy()
    dotted.putpixel((39, 10), (0, 0, 255))
    apng = encode(red, "PNG", save_all=True, append_images=[dotted, Image.new("RGB", (40, 20), "green")],
                  duration=durations, loop=0)
    result = resize(apng, Params(width=10, height=10, fit="cover", gravity="west", format="gif"))
    assert _delays(result.data) == written and result.output.frames == 2


@pytest.mark.parametrize("fmt", ["png", "webp", "gif"])
def test_the_output_frame_count_is_what_the_file_holds(fmt):
    """APNG's and WebP's writers merge frames that come out the same into one: the output's facts (and
    the output pixels billed) counted the frames handed to them, 3 where the file holds 2."""
    red = Image.new("RGB", (40, 20), "red")
    dotted = red.copy()
    dotted.putpixel((39, 10), (0, 0, 255))  # cropped away by cover + west: the same frame as red
    apng = encode(red, "PNG", save_all=True, append_images=[dotted, Image.new("RGB", (40, 20), "green")],
                  duration=[100, 100, 100], loop=0)
    result = resize(apng, Params(width=10, height=10, fit="cover", gravity="west", format=fmt))
    assert result.output.frames == len(frames_of(result.data)) == 2


@pytest.mark.parametrize("fmt", ["gif", "webp", "png", "avif"])
def test_an_apng_s_default_image_is_not_an_animation_frame(fmt):
    """The IDAT image of an APNG with default_image is the still fallback for viewers without APNG;
    it was played as a first frame of duration 0."""
    white, red, green = (Image.new("RGB", (20, 10), c) for c in ((255, 255, 255), (250, 0, 0), (0, 250, 0)))
    apng = encode(white, "PNG", save_all=True, append_images=[red, green], default_image=True, duration=[0, 60, 70])
    result = resize(apng, Params(width=10, format=fmt))
    frames = frames_of(result.data)
    assert len(frames) == 2 == result.output.frames
    assert [f.getpixel((5, 2)) for f in frames][0][0] > 200 and frames[1].getpixel((5, 2))[1] > 200
    still = decode(resize(apng, Params(width=10, format="jpeg")).data)  # no animation: the fallback
    assert min(still.getpixel((5, 2))) > 240


@pytest.mark.parametrize("fmt,source", [("jpeg", lambda: corpus("chelsea-animated.gif")),
                                        # AVIF: an animation that does not play forever (this one once)
                                        ("avif", lambda: _gif_played_once(corpus("chelsea-animated.gif")))])
def test_animation_becomes_its_first_frame_otherwise(fmt, source):
    source = source()
    result = resize(source, Params(width=112, format=fmt))
    out = Image.open(io.BytesIO(result.data))
    assert getattr(out, "n_frames", 1) == 1 and result.output.frames == 1
    first = frames_of(source)[0].resize((112, 75))
    assert ImageStat.Stat(ImageChops.difference(out.convert("RGB"), first)).mean[0] < 10


@pytest.mark.parametrize("fmt", ["gif", "webp", "png"])
def test_transparent_animation_keeps_transparency(fmt):
    frames = []
    for x in (0, 20):
        im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
        ImageDraw.Draw(im).rectangle((x, 0, x + 19, 19), fill=(250, 0, 0, 255))
        frames.append(im)
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=50)
    out = frames_of_rgba(resize(apng, Params(width=40, format=fmt)).data)
    assert len(out) == 2
    assert out[0].getpixel((5, 10))[3] == 255 and out[0].getpixel((35, 10))[3] == 0
    assert out[1].getpixel((5, 10))[3] == 0 and out[1].getpixel((35, 10))[3] == 255


@pytest.mark.parametrize("band", [(0, 0, 39, 3), (0, 0, 2, 39), (0, 36, 39, 39)])
def test_opaque_black_at_a_later_gif_frame_s_edge_is_not_cut_away(band):
    """With disposal 2, Pillow's GIF writer crops a later frame to where it differs from the first
    frame's transparent index, and compared colours: that entry was black, so a later frame's opaque
    black edge rows (or columns) fell outside its rectangle and showed transparent."""
    first = Image.new("RGBA", (40, 40), (200, 30, 30, 255))
    first.putpixel((20, 20), (0, 0, 0, 0))
    second = Image.new("RGBA", (40, 40), (30, 200, 30, 255))
    ImageDraw.Draw(second).rectangle(band, fill=(0, 0, 0, 255))
    apng = encode(first, "PNG", save_all=True, append_images=[second], duration=[200, 200], loop=0)
    out = frames_of_rgba(resize(apng, Params(width=40, format="gif")).data)
    assert out[0].getpixel((20, 20))[3] == 0 and out[0].getpixel((0, 0)) == (200, 30, 30, 255)
    assert out[1].getpixel(band[:2]) == (0, 0, 0, 255) and out[1].getpixel((20, 20)) == (30, 200, 30, 255)


def frames_of_rgba(data: bytes) -> list[Image.Image]:
    im = Image.open(io.BytesIO(data))
    out = []
    for i in range(im.n_frames):
        im.seek(i)
        im.load()
        out.append(im.convert("RGBA"))
    return out


# --- orientation, metadata, colour -------------------------------------------------------------

def test_exif_orientation_is_applied():
    rotated = corpus("rocket-exif-orientation-6.jpg")
    assert probe(rotated).width == 427 and probe(rotated).height == 640  # probe: as stored
    for params in (Params(width=320), Params(width=100, height=100, fit="cover"), Params(width=320, format="png")):
        result = resize(rotated, params)
        out = decode(result.data).convert("RGB")
        reference = decode(resize(corpus("rocket.jpg"), params).data).convert("RGB")
        assert out.size == reference.size and out.width >= out.height  # upright is landscape
        assert ImageStat.Stat(ImageChops.difference(out, reference)).mean[0] < 6


def test_exif_orientation_with_draft_decoding():
    """Orientation 6 plus a DCT-scaled decode (1/4 here): geometry and picture still right."""
    big = decode(corpus("photo-900k.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = encode(big.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90, exif=exif.tobytes())
    result = resize(stored, Params(width=320, height=320, fit="inside", format="png"))
    out = decode(result.data).convert("RGB")
    assert out.size == (320, 240)
    expected = big.resize((320, 240), Image.Resampling.LANCZOS)
    assert ImageStat.Stat(ImageChops.difference(out, expected)).mean[0] < 4


XMP_ORIENTATION_6 = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                     b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/>'
                     b'</rdf:RDF></x:xmpmeta>')


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_an_orientation_in_xmp_only_is_not_applied(fmt):
    """Browsers, libvips and sharp turn a picture by its EXIF tag only; Pillow's getexif() also reads
    an XMP tiff:Orientation, and the picture came out turned here alone. With an EXIF tag as well,
    the EXIF tag decides."""
    wide = Image.new("RGB", (80, 40), (200, 30, 30))
    xmp_only = encode(wide, fmt, xmp=XMP_ORIENTATION_6)
    assert decode(resize(xmp_only, Params(width=40, format="png")).data).size == (40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    both = encode(wide, fmt, xmp=XMP_ORIENTATION_6, exif=exif.tobytes())
    assert decode(resize(both, Params(width=40, format="png")).data).size == (40, 80)


def _icc_profile(space: bytes, description: str, gamma: float) -> bytes:
    """A minimal ICC v2 monitor profile (white point D50, one gamma curve a channel): GRAY, or RGB with
    sRGB's primaries (adapted to D50)."""
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in (x, y, z))

    text = description.encode() + b"\0"
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    tags = [(b"desc", b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 79),
            (b"wtpt", xyz(0.9642, 1.0, 0.8249))]
    if space == b"GRAY":
        tags.append((b"kTRC", curve))
    else:
        tags += [(b"rXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
                 (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags:
        data += b"\0" * (-(offset + len(data)) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I", 128 + len(body)) + b"lcms" + struct.pack(">I", 0x02100000) + b"mntr" + space.ljust(4)
              + b"XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">Iiii", 0, 63190, 65536, 54061) + b"\0" * 48)
    return header + body


def _grey_profile(gamma: float) -> bytes:
    return _icc_profile(b"GRAY", "Grey gamma test", gamma)


@pytest.mark.parametrize("description", ["sRGB-elle-V2-g10.icc", "Linear RGB, sRGB primaries"])
def test_a_profile_is_judged_by_what_it_does_not_by_its_name(description):
    """A linear-light profile with sRGB's primaries (Elle Stone's "sRGB-elle-V2-g10.icc" is a common
    one): 50 in it is 122 in sRGB. Any profile whose description began "sRGB" was skipped as sRGB, and
    its image came out far too dark (50)."""
    linear = encode(Image.new("RGB", (40, 20), (50, 50, 50)), "PNG", icc_profile=_icc_profile(b"RGB", description, 1.0))
    pixel = decode(resize(linear, Params(width=20, format="png")).data).getpixel((10, 5))
    assert all(abs(v - 122) <= 2 for v in pixel)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("PNG", "L"), ("PNG", "LA")])
def test_a_grey_image_s_profile_is_converted_to_srgb(fmt, mode):
    """A grey picture with a grey ICC profile (gamma 1.0 here) is converted to sRGB's tones, as an
    RGB one with an RGB profile is: 64 on that curve is 137 in sRGB. It was left at 64, and the
    profile stripped."""
    grey = Image.new(mode, (40, 20), 64 if mode == "L" else (64, 255))
    out = decode(resize(encode(grey, fmt, icc_profile=_grey_profile(1.0)), Params(width=20, format="png")).data)
    pixel = out.getpixel((10, 5))
    assert out.mode == mode and abs((pixel[0] if mode == "LA" else pixel) - 137) <= 2
    assert "icc_profile" not in out.info


def test_metadata_is_stripped():
    source = corpus("rocket-exif-orientation-6.jpg")
    assert "exif" in Image.open(io.BytesIO(source)).info and "comment" in Image.open(io.BytesIO(source)).info
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "ACME camera"
    gps = {1: "N", 2: (52.0, 22.0, 0.0)}
    exif[0x8825] = gps
    tagged = encode(decode(source), "JPEG", exif=exif.tobytes(), comment=b"secret", xmp=b"<x:xmpmeta>secret</x:xmpmeta>",
                    icc_profile=decode(corpus("chelsea-alpha.png")).info["icc_profile"])
    for data in (source, tagged, corpus("chelsea-alpha.png")):
        for fmt in FORMATS:
            out_bytes = resize(data, Params(width=50, format=fmt)).data
            out = Image.open(io.BytesIO(out_bytes))
            assert not out.getexif(), fmt
            assert not {"exif", "comment", "icc_profile", "xmp", "XML:com.adobe.xmp"} & set(out.info), (fmt, out.info)
            assert b"secret" not in out_bytes and b"ACME" not in out_bytes


def test_unusable_embedded_profile_is_ignored():
    photo = small_photo()
    tagged = encode(photo, "JPEG", quality=95, icc_profile=b"not an icc profile at all")
    assert Image.open(io.BytesIO(tagged)).info["icc_profile"]
    out = decode(resize(tagged, Params(width=60, format="png")).data)
    assert "icc_profile" not in out.info
    assert close(mean(out), mean(photo.resize((60, 40))), 3)


def test_cmyk_jpeg_comes_out_in_the_right_colours():
    result = resize(corpus("coffee-cmyk.jpg"), Params(width=300))
    assert result.input.mode == "CMYK"
    out = decode(result.data)
    assert out.mode == "RGB"
    expected = decode(corpus("coffee.jpg")).resize((300, 200))
    assert close(mean(out), mean(expected), 4)
    # An inverted-CMYK mistake would turn the brown coffee blue-ish: make sure that can fail.
    assert not close(mean(ImageChops.invert(out)), mean(expected), 4)


def test_a_cmyk_jpeg_without_adobe_s_marker_is_not_read_as_inverted():
    """Pillow reads every CMYK JPEG as Adobe's inverted CMYK; a file without Adobe's APP14 marker holds
    plain CMYK (libvips, hence sharp, inverts only files with the marker). Red ink came out black."""
    red_ink = Image.new("CMYK", (64, 48), (0, 255, 255, 0))
    adobe = encode(red_ink, "JPEG", quality=95)  # Pillow writes inverted values and the marker
    assert "adobe" in decode(adobe).info
    inverted = encode(ImageChops.invert(red_ink), "JPEG", quality=95)
    at = inverted.index(b"\xff\xee")
    plain = inverted[:at] + inverted[at + 2 + struct.unpack(">H", inverted[at + 2:at + 4])[0]:]
    for data in (adobe, plain):
        pixel = decode(resize(data, Params(width=32, format="png")).data).getpixel((16, 12))
        assert pixel[0] > 230 and pixel[1] < 30 and pixel[2] < 30, pixel


def test_a_dark_16_bit_png_stays_dark():
    """All samples <= 255 of 65535: near black. Guessing the depth from the brightest sample made it
    white (255 -> 255, while 256 -> 1)."""
    dark = Image.new("I;16", (20, 20), 255)
    out = decode(resize(encode(dark, "PNG"), Params(width=10, format="png")).data)
    assert mean(out, "L")[0] < 2


def test_a_16_bit_grey_png_keeps_its_transparent_grey():
    """tRNS in a 16-bit grey PNG names one 16-bit value: that grey becomes transparent, nothing else,
    and no 16-bit tRNS value is carried into the 8-bit output."""
    im = Image.new("I;16", (4, 1))
    im.putdata([0, 5000, 4999, 65535])
    result = resize(encode(im, "PNG", transparency=5000), Params(width=4, format="png"))
    out = decode(result.data)
    assert out.mode == "LA" and result.output.has_alpha and "transparency" not in out.info
    assert [out.getpixel((x, 0))[1] for x in range(4)] == [255, 0, 255, 255]
    assert [out.getpixel((x, 0))[0] for x in (0, 3)] == [0, 255]


def test_16_bit_png_is_scaled_not_clipped():
    result = resize(corpus("retina-16bit.png"), Params(width=300, format="png"))
    assert result.input.mode == "I;16"
    out = decode(result.data)
    expected = decode(corpus("retina.jpg")).convert("L").resize((300, 300))
    assert abs(mean(out, "L")[0] - mean(expected, "L")[0]) < 6  # ~90; clipping gives ~250


def test_grey_and_progressive_jpeg_inputs():
    grey = resize(corpus("astronaut-gray.jpg"), Params(width=128))
    assert grey.output.mode == "L" and decode(grey.data).size == (128, 128)
    progressive = decode(resize(corpus("hubble-progressive.jpg"), Params(width=250)).data)
    baseline = decode(resize(corpus("hubble_deep_field.jpg"), Params(width=250)).data)
    assert progressive.size == baseline.size == (250, 218)
    assert ImageStat.Stat(ImageChops.difference(progressive, baseline)).mean[0] < 4


def test_output_colour_matches_a_plain_lanczos_resize():
    """The fast path (draft + reduce) must look like the slow one."""
    data = corpus("photo-256k-1.jpg")
    for box in ((256, 256), (100, 100), (800, 800)):
        out = decode(resize(data, Params(width=box[0], height=box[1], format="png")).data).convert("RGB")
        reference = decode(data).resize(out.size, Image.Resampling.LANCZOS)
        assert ImageStat.Stat(ImageChops.difference(out, reference)).mean[0] < 3, box


# --- hostile input -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("photo-256k-0.jpg", ImageFacts("jpeg", 1280, 960, 257973, 1, "RGB", False)),
        ("chelsea-alpha.png", ImageFacts("png", 451, 300, 252336, 1, "RGBA", True)),
        ("chelsea-animated.gif", ImageFacts("gif", 225, 150, 321077, 12, "P", False)),
        ("retina-16bit.png", ImageFacts("png", 1411, 1411, 632325, 1, "I;16", False)),
        ("coffee-cmyk.jpg", ImageFacts("jpeg", 600, 400, 189531, 1, "CMYK", False)),
        ("rocket.webp", ImageFacts("webp", 640, 427, 23634, 1, "RGB", False)),
    ],
)
def test_probe_reads_only_the_header(monkeypatch, name, expected):
    data = corpus(name)
    _refuse_decoding(monkeypatch)
    assert probe(data) == expected


def test_large_jpeg_reductions_decode_at_reduced_scale(monkeypatch):
    """The speed path: ask libjpeg for a DCT-scaled decode that stays >= 1.5x the target."""
    from PIL import JpegImagePlugin

    asked = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        asked.append(size)
        return real_draft(self, mode, size)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    photo = corpus("photo-256k-0.jpg")  # 1280x960
    resize(photo, Params(width=256, height=256))  # shrink 5: 1/4 would leave 1.25x, so 1/2: 640x480
    resize(photo, Params(width=100, height=100))  # shrink 12.8: 1/8 scale, 160x120
    resize(photo, Params(width=800, height=800))  # shrink 1.6: full decode
    assert asked == [(640, 480), (160, 120)]


def test_empty_and_random_bytes():
    with pytest.raises(CorruptImage):
        resize(b"", Params(width=10))
    with pytest.raises(UnsupportedImage) as info:
        resize(random.Random(1).randbytes(5000), Params(width=10))
    assert info.value.status == 415 and info.value.code == "unsupported_media_type"


@pytest.mark.parametrize("name", ["photo-256k-0.jpg", "coffee.png", "rocket.webp", "chelsea-animated.gif"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 40])
def test_truncated_files_are_corrupt(name, keep):
    data = corpus(name)
    cut = data[: int(len(data) * keep)] if keep < 1 else data[:keep]
    with pytest.raises(CorruptImage) as info:
        resize(cut, Params(width=64, format="png"))
    assert info.value.status == 422


def test_png_with_broken_crcs_is_corrupt():
    data = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "PNG")
    header = bytearray(data)
    header[8 + 8 + 13] ^= 0xFF  # IHDR's CRC
    with pytest.raises(CorruptImage):
        probe(bytes(header))
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    pixels = bytearray(data)
    pixels[idat + 4 + length] ^= 0x01  # IDAT's CRC: Pillow alone would not notice
    assert decode(bytes(pixels)).size == (64, 48)
    with pytest.raises(CorruptImage):
        resize(bytes(pixels), Params(width=10))


def _refuse_decoding(monkeypatch):
    def load(self):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("size", [(100_000, 100_000), (8000, 8000)])
def test_huge_declared_png_is_refused_without_decoding(monkeypatch, size):
    data = png_declaring(*size)
    _refuse_decoding(monkeypatch)  # a decode would raise, not ImageTooLarge
    for call in (lambda: probe(data), lambda: resize(data, Params(width=100))):
        with pytest.raises(ImageTooLarge) as info:
            call()
        assert info.value.status == 422 and info.value.code == "image_too_large"
        # Our limit, in our words, also past Pillow's own bomb guard (~179 MP), which fires first and
        # whose message ("could be decompression bomb DOS attack") was passed through.
        assert f"the limit is {Limits().max_pixels} pixels" in info.value.message, info.value.message
        assert "decompression bomb" not in info.value.message


def test_pixel_frame_and_byte_limits():
    photo = corpus("photo-256k-0.jpg")
    with pytest.raises(ImageTooLarge):
        probe(photo, Limits(max_pixels=1280 * 960 - 1))
    assert probe(photo, Limits(max_pixels=1280 * 960)).width == 1280
    with pytest.raises(InputTooLarge) as info:
        probe(photo, Limits(max_input_bytes=len(photo) - 1))
    assert info.value.status == 413
    animated = corpus("chelsea-animated.gif")
    assert probe(animated).frames == 12
    with pytest.raises(ImageTooLarge):
        probe(animated, Limits(max_frames=11))
    with pytest.raises(ImageTooLarge):
        probe(animated, Limits(max_animation_pixels=12 * 225 * 150 - 1))
    with pytest.raises(OutputTooLarge):
        resize(animated, Params(width=200, format="gif"), Limits(max_output_pixels=200 * 133 * 12 - 1))
    assert resize(animated, Params(width=200, format="jpeg"), Limits(max_output_pixels=200 * 133)).output.frames == 1
    with pytest.raises(OutputTooLarge):
        resize(photo, Params(width=8000, height=8000, fit="fill"))


def test_gif_with_too_many_frames():
    data = gif_with_frames(301)
    with pytest.raises(ImageTooLarge):
        probe(data)
    assert probe(gif_with_frames(300)).frames == 300


def test_a_gifs_frames_are_counted_only_up_to_the_limit():
    """Pillow's n_frames walks every frame in Python (a 25 MB GIF of 1x1 frames holds ~2 million):
    the count stops one past the limit, which the refusal says."""
    with pytest.raises(ImageTooLarge, match="more than 10 frames"):
        probe(gif_with_frames(5000), Limits(max_frames=10))


def gif_growing_canvas(offset: int) -> bytes:
    """Three 10x10 frames on a 10x10 screen, the last two placed at (offset, offset): Pillow grows
    the canvas it decodes into to (offset + 10) squared, which the header does not say."""
    frames = [Image.new("P", (10, 10), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    data = bytearray(encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, optimize=False))
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, 10, 10)
    places = [i for i in range(len(data)) if data[i:i + 9] == descriptor]
    assert len(places) == 3
    for at in places[1:]:
        data[at + 1:at + 5] = struct.pack("<HH", offset, offset)
    return bytes(data)


def test_gif_frames_growing_the_canvas_count_against_the_animation_limit():
    """The header says 3 x 10 x 10; the frames' placement grows the canvas to 510 x 510. Refused from
    the blocks, before Pillow opens the file (it allocates each frame's canvas as it reaches it)."""
    data = gif_growing_canvas(500)
    for attempt in (lambda: probe(data, Limits(max_animation_pixels=1000)),
                    lambda: resize(data, Params(width=8, format="gif"), Limits(max_animation_pixels=1000))):
        with pytest.raises(ImageTooLarge, match="510x510"):
            attempt()
    # Within the default limit it is made. Clipped to the 10x10 screen the three frames look the same,
    # so they are one frame (Pillow's writer merged them before too, while output.frames said 3).
    assert resize(data, Params(width=8, format="gif")).output.frames == 1


@pytest.mark.parametrize("at_frame", [0, 1])
def test_a_gif_frame_past_the_pixel_limit_is_refused_before_pillow_allocates_it(at_frame, monkeypatch):
    """A 1x1 screen, and a frame declaring 13000 x 13000: Pillow allocated its 169 MP canvas on
    open (frame 0) or seek (frame 1), before the limit was checked."""
    data = bytearray(gif_growing_canvas(0))
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, 10, 10)
    at = [i for i in range(len(data)) if data[i:i + 9] == descriptor][at_frame]
    data[at + 5:at + 9] = struct.pack("<HH", 13000, 13000)
    data[6:10] = struct.pack("<HH", 1, 1)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("Pillow opened it"))
    for attempt in (lambda: probe(bytes(data)), lambda: resize(bytes(data), Params(width=8, format="gif"))):
        with pytest.raises(ImageTooLarge, match="13000x13000"):
            attempt()
    assert not opened


def test_stray_bytes_do_not_hide_a_gif_frame_from_the_scan():
    """Pillow skips a byte that starts no block and reads on: the scan does too (it stopped there, so
    one junk byte before a 13000 x 13000 descriptor hid it)."""
    data = bytearray(gif_growing_canvas(0))
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, 10, 10)
    at = [i for i in range(len(data)) if data[i:i + 9] == descriptor][1]
    data[at + 5:at + 9] = struct.pack("<HH", 13000, 13000)
    data[at:at] = b"\x00"
    with pytest.raises(ImageTooLarge, match="13000x13000"):
        probe(bytes(data))


def test_a_gif_of_countless_tiny_blocks_is_refused_quickly():
    """A 1-byte comment extension repeated through a big file: seconds of Python in any block walk."""
    head = gif_growing_canvas(0)
    trailer = head.rindex(b";")
    data = head[:trailer] + b"\x21\xfe\x01a\x00" * 400_000 + b";"
    with pytest.raises(CorruptImage, match="tiny blocks"):
        probe(data)


def test_a_tiff_with_an_xmp_orientation_is_not_turned_under_its_canvas():
    """Pillow sizes a TIFF by its EXIF tag but turns its pixels on load by getexif(), which reads an
    XMP orientation too: a 20 x 10 picture came out 20 x 10 with its right half black."""
    from PIL import TiffImagePlugin

    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[700] = XMP_ORIENTATION_6
    tags.tagtype[700] = 1
    data = encode(Image.new("RGB", (20, 10), (250, 0, 0)), "TIFF", tiffinfo=tags)
    out = decode(resize(data, Params(width=20, format="png")).data).convert("RGB")
    assert out.size == (20, 10) and out.getpixel((15, 5))[0] > 200


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_a_tiff_is_turned_upright_once(fmt):
    """Pillow turns a TIFF upright by its orientation tag as it opens it: turned again here, a
    portrait came out landscape and upside down."""
    wide = Image.new("RGB", (20, 10), (250, 0, 0))
    ImageDraw.Draw(wide).rectangle((0, 0, 9, 9), fill=(0, 0, 250))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    out = decode(resize(encode(wide, fmt, exif=exif.tobytes()), Params(width=10, format="png")).data).convert("RGB")
    assert out.size == (10, 20)
    assert out.getpixel((5, 2))[2] > 200 and out.getpixel((5, 17))[0] > 200  # blue on top once turned


def rle8_bmp(width: int, height: int) -> bytes:
    """A run-length (RLE8) BMP: each row one pixel of colour 0, then end-of-line: tiny for any size."""
    pixels = (b"\x01\x00" + b"\x00\x00") * height + b"\x00\x01"
    palette = b"\x00\x00\x00\x00" + b"\xff\xff\xff\x00"
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 2, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def test_run_length_bmp_has_a_smaller_pixel_limit():
    """Pillow decodes RLE BMP in Python, ~0.13 s a megapixel whatever the file's size."""
    assert resize(rle8_bmp(300, 200), Params(width=30, format="png")).output.width == 30
    with pytest.raises(ImageTooLarge, match="(?i)run-length BMP"):
        probe(rle8_bmp(2100, 2000))  # 4.2 MP, in a 16 KB file


def test_a_png_of_countless_chunks_is_refused_before_pillow_walks_them():
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    def chunk(kind: bytes, body: bytes = b"") -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"zzZz") * 20_001
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND"))
    with pytest.raises(CorruptImage, match="chunks"):
        probe(data)
    # A real file's few thousand chunks pass: 25 MB of libpng's 8 KB IDATs is ~3,200.
    many = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"zzZz") * 5_000
            + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND"))
    assert probe(many).width == 1


def ico_bytes() -> bytes:
    return encode(Image.new("RGB", (32, 32), (1, 2, 3)), "ICO")


@pytest.mark.parametrize(
    "data",
    [
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
        b"8BPS\x00\x01" + b"\x00" * 40,
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"SIMPLE  =                    T" + b" " * 50,
        "ico",
    ],
    ids=["eps", "pdf", "psd", "svg", "fits", "ico"],
)
def test_formats_we_do_not_open(data):
    if data == "ico":
        data = ico_bytes()
        assert Image.open(io.BytesIO(data)).format == "ICO"  # a real image, just not one we take
    with pytest.raises(UnsupportedImage):
        probe(data)
    with pytest.raises(UnsupportedImage):
        resize(data, Params(width=10))


def test_eps_is_never_handed_to_pillow(monkeypatch):
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert EpsImagePlugin._accept(data)  # Pillow would try it, and Ghostscript behind it

    def boom(*args, **kwargs):
        raise AssertionError("EPS plugin used")
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", boom)
    with pytest.raises(UnsupportedImage):
        resize(data, Params(width=10))


@pytest.mark.parametrize(
    "params",
    [
        Params(), Params(width=0), Params(width=8193), Params(height=-1), Params(width=True), Params(width=1.5),
        Params(width=10, fit="stretch"), Params(width=10, format="bmp"), Params(width=10, gravity="up"),
        Params(width=10, background="red"), Params(width=10, background="#12345"), Params(width=10, quality=0),
        Params(width=10, quality=101), Params(width=10, accept="webp"),
    ],
)
def test_bad_parameters(params):
    with pytest.raises(InvalidParameters) as info:
        validate(params)
    assert info.value.status == 400 and info.value.code == "invalid_parameter"
    with pytest.raises(InvalidParameters):
        resize(corpus("chelsea.jpg"), params)


def test_good_parameters():
    for params in (Params(width=1), Params(height=8192), Params(width=5, background="#00ff0080", quality=1),
                   Params(width=5, format="auto", accept=("avif",)), Params(width=5, gravity="entropy", fit="cover")):
        validate(params)


def test_quality_changes_lossy_output():
    photo = corpus("photo-256k-2.jpg")
    for fmt in ("jpeg", "webp", "avif"):
        low = resize(photo, Params(width=400, format=fmt, quality=20)).data
        high = resize(photo, Params(width=400, format=fmt, quality=95)).data
        assert len(low) < len(high), fmt


# --- fuzzing -----------------------------------------------------------------------------------

def _seeds() -> list[bytes]:
    base = small_photo().resize((64, 48))
    frames = [base, base.rotate(90), base.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    exif = Image.Exif()
    exif[0x0112] = 6
    return [
        encode(base, "JPEG", quality=70),
        encode(base, "JPEG", quality=70, progressive=True, exif=exif.tobytes()),
        encode(base.convert("CMYK"), "JPEG"),
        encode(base.convert("L"), "JPEG"),
        encode(base.convert("L").convert("I;16"), "PNG"),
        encode(base, "AVIF", quality=50),
        encode(base.convert("RGBA"), "PNG"),
        encode(base, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0),
        encode(base, "WEBP", quality=60),
        encode(base, "WEBP", save_all=True, append_images=frames[1:], duration=40),
        encode(base, "PNG", save_all=True, append_images=frames[1:]),  # APNG
        encode(base, "BMP"),
        encode(base, "TIFF"),
    ]


SEEDS = _seeds()
FUZZ_LIMITS = Limits(max_pixels=2_000_000, max_animation_pixels=4_000_000, max_output_pixels=2_000_000)


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "header"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "header" and len(data) > 40:  # the bytes that hold sizes and counts
            data[draw(st.integers(0, 40))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(), fmt=st.sampled_from((None, *FORMATS)))
def test_fuzzed_inputs_raise_only_image_errors(data, fmt):
    try:
        probe(data, FUZZ_LIMITS)
    except ImageError:
        pass
    try:
        result = resize(data, Params(width=32, height=32, fit="cover", format=fmt), FUZZ_LIMITS)
    except ImageError as e:
        assert e.status in (413, 415, 422) and e.message
    else:
        assert decode(result.data).size == (32, 32)


def test_a_png_output_too_large_is_refused_before_decoding(monkeypatch):
    """A PNG is decoded before its orientation is known (its eXIf chunk may follow the pixels): an
    output too large whichever way up is refused first, without that decode."""
    from PIL import PngImagePlugin

    big = encode(Image.new("RGB", (3000, 2000)), "PNG")
    decoded = []
    original = PngImagePlugin.PngImageFile.load_end
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load_end",
                        lambda self: (decoded.append(1), original(self))[1])
    with pytest.raises(OutputTooLarge):
        resize(big, Params(width=8000, height=8000, fit="fill", format="png"), Limits(max_output_pixels=10_000_000))
    assert decoded == []
    assert resize(big, Params(width=300, format="png")).output.width == 300
    assert decoded == [1]


# --- headers that cost Pillow millions of Python objects at open (the API's probe) --------------

def _tiff_with_strips(count: int) -> bytes:
    """A 1x2 grey TIFF whose StripOffsets (SHORT) list `count` strips, all pointing at its 2 pixels:
    Pillow wraps around the image and builds one tile a strip."""
    entry = lambda tag, kind, n, value: struct.pack("<HHII", tag, kind, n, value)  # noqa: E731
    pixels = 8 + 2 + 12 * 9 + 4
    entries = [entry(256, 4, 1, 1), entry(257, 4, 1, 2), entry(258, 3, 1, 8), entry(259, 3, 1, 1),
               entry(262, 3, 1, 1), entry(273, 3, count, pixels + 2), entry(277, 3, 1, 1), entry(278, 4, 1, 1),
               entry(279, 4, 1, 1)]
    return (b"II*\0" + struct.pack("<IH", 8, 9) + b"".join(entries) + b"\0" * 4 + b"\x80\x80"
            + struct.pack("<H", pixels) * count)


def test_a_tiff_with_a_huge_strip_list_is_refused_before_pillow_opens_it():
    """2 MB of strip offsets on a 1x2 image cost 1.7 s of CPU and 256 MB in probe()."""
    assert probe(_tiff_with_strips(2)).width == 1  # the same file with its two strips is fine
    with pytest.raises(ImageTooLarge, match="strips or tiles"):
        probe(_tiff_with_strips(200_000))


def _jpeg_with(filler: bytes, times: int) -> bytes:
    plain = encode(Image.new("RGB", (16, 16), "red"), "JPEG")
    return plain[:2] + filler * times + plain[2:]


@pytest.mark.parametrize("filler,times", [(b"\xff\xe0\x00\x02", 2_000), (b"\xff\xfe\x00\x02", 2_000),
                                          (b"\xff", 10_000)])
def test_a_jpeg_flooded_with_segments_or_fill_bytes_is_refused(filler, times):
    """Pillow walks a JPEG's header in Python, fill bytes one at a time, and keeps every APPn segment:
    4 MB of empty segments cost ~1 s of the API's CPU in probe()."""
    assert probe(_jpeg_with(filler, 50)).width == 16  # a few are harmless (real files have dozens)
    with pytest.raises(CorruptImage):
        probe(_jpeg_with(filler, times))


@pytest.mark.parametrize("depth,clear", [(1, 1), (2, 3), (4, 15)])
def test_a_low_bit_grey_png_keeps_its_transparent_grey(depth, clear):
    """Pillow scales a 1-, 2- or 4-bit grey PNG's samples to 8 bits but not its tRNS value: the
    transparent pixels came out opaque (white on a red background instead of red)."""
    width = 8
    rows = b"".join(b"\0" + _pack_bits([clear] * (width // 2) + [0] * (width // 2), depth) for _ in range(2))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 2, depth, 0, 0, 0, 0))
           + chunk(b"tRNS", struct.pack(">H", clear)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    out = decode(resize(png, Params(width=8, format="png")).data).convert("RGBA")
    assert out.getpixel((0, 0))[3] == 0 and out.getpixel((7, 0))[3] == 255
    on_red = decode(resize(png, Params(width=8, format="jpeg", background="ff0000")).data).convert("RGB")
    assert on_red.getpixel((0, 0))[0] > 200 and on_red.getpixel((0, 0))[1] < 60  # red shows through
    assert on_red.getpixel((7, 0))[0] < 60  # the opaque black pixels stay black


def test_a_16_bit_rgb_png_keeps_its_transparent_colour():
    """Pillow decodes a 16-bit RGB PNG's samples to their high bytes but keeps its 16-bit tRNS key,
    which then matched nothing: the transparent pixels came out opaque, (128, 18, 86)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    key, blue = b"\x80\x80\x12\x34\x56\x78", b"\x00\x00\x00\x00\xff\xff"
    rows = b"".join(b"\0" + key * 2 + blue * 2 for _ in range(4))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0))
           + chunk(b"tRNS", key) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert probe(png).has_alpha
    for fmt in ("png", "webp"):
        out = decode(resize(png, Params(width=4, format=fmt)).data).convert("RGBA")
        assert out.getpixel((0, 0))[3] == 0 and close(list(out.getpixel((3, 0))), [0, 0, 255, 255], 8)
    on_red = decode(resize(png, Params(width=4, format="jpeg", background="ff0000")).data).convert("RGB")
    assert close(list(on_red.getpixel((0, 0))), [255, 0, 0], 40) and on_red.getpixel((3, 0))[2] > 200


def _pack_bits(values: list[int], depth: int) -> bytes:
    bits = "".join(format(v, f"0{depth}b") for v in values)
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8))


def test_a_float_tiff_on_the_zero_to_one_scale_is_not_black():
    gradient = Image.linear_gradient("L").point(lambda v: v / 255.0, "F")
    out = decode(resize(encode(gradient, "TIFF"), Params(width=64, format="png")).data).convert("L")
    assert out.getextrema()[1] > 200


def _grey_tiff(bits: int, samples: list[int], width: int) -> bytes:
    """An uncompressed grey TIFF of `bits` bits a sample (Pillow writes no 12-bit TIFF)."""
    rows = [samples[i:i + width] for i in range(0, len(samples), width)]
    pixels = b"".join(struct.pack(f"<{width}H", *row) if bits == 16 else _pack_bits(row, bits) for row in rows)
    tags = [(256, 3, width), (257, 3, len(rows)), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 3, len(rows)), (279, 4, len(pixels))]
    start = 8 + 2 + 12 * len(tags) + 4
    directory = struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", start if tag == 273 else value))
        for tag, kind, value in tags) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + directory + pixels


@pytest.mark.parametrize("bits", [12, 16])
def test_a_grey_tiff_is_scaled_by_its_declared_bit_depth(bits):
    """Pillow opens a 12-bit grey TIFF as I;16 with values up to 4095; taken as 16-bit (v/256), white
    came out 15 of 255."""
    top = (1 << bits) - 1
    tiff = _grey_tiff(bits, [top, top // 2, 0, top], 2)
    assert decode(tiff).mode.startswith("I;16")
    out = decode(resize(tiff, Params(width=2, format="png")).data).convert("L")
    assert [out.getpixel((x, y)) for y in (0, 1) for x in (0, 1)] == [255, 127, 0, 255]


def test_the_colour_transform_cache_keeps_digests_not_profiles():
    """Keyed by the profile's bytes, the cache held up to 32 profiles (~24 MB each in a WebP) alive in
    every worker child; a profile over 1 MB is built for its job and not kept."""
    from PIL import ImageCms

    from resizer import imaging

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    big = srgb + b"\0" * (2 << 20)  # an oversized (padded) profile
    before = dict(imaging._icc_cache)
    resize(encode(Image.new("RGB", (16, 16), "blue"), "WEBP", icc_profile=big), Params(width=8, format="png"))
    assert set(imaging._icc_cache) == set(before)
    resize(encode(Image.new("RGB", (16, 16), "blue"), "PNG", icc_profile=srgb), Params(width=8, format="png"))
    assert all(len(digest) == 32 for digest, _mode in imaging._icc_cache)


def test_output_check_refuses_only_what_no_orientation_allows():
    """The API's check from the header: the EXIF orientation is known only once the image decodes, so
    an output possible one way up is left to the worker."""
    from resizer.imaging import ImageFacts, output_check

    landscape = ImageFacts(format="jpeg", width=6000, height=4000, bytes=1)
    output_check(Params(width=8192, fit="inside", enlarge=True), landscape)  # 8192x5461 this way up
    with pytest.raises(OutputTooLarge):
        output_check(Params(width=8192, height=8192, fit="fill"), landscape)  # 67 MP either way


def _jpeg_of_scans(extra: int) -> bytes:
    """A small progressive JPEG with its second scan (an AC scan) repeated `extra` more times."""
    base = encode(Image.new("L", (64, 64), 128), "JPEG", progressive=True, quality=90)
    second, third = [m.start() for m in re.finditer(rb"\xff\xda", base)][1:3]
    return base[:-2] + base[second:third] * extra + b"\xff\xd9"


def test_a_progressive_jpeg_of_countless_scans_is_refused_before_decoding(monkeypatch):
    """libjpeg walks every block again for each scan, even a bogus repeat (a warning only), in one C
    call: 3,000 copies of a 31-byte scan on a 4000x4000 grey image cost ~3.7 s of worker CPU."""
    assert decode(_jpeg_of_scans(200)).size == (64, 64)  # libjpeg takes such a file, warning only
    assert resize(_jpeg_of_scans(200), Params(width=8)).output.width == 8  # within the bound
    assert probe(corpus("hubble-progressive.jpg")).format == "jpeg"  # a real progressive file: 10 scans
    flood = _jpeg_of_scans(300)
    _refuse_decoding(monkeypatch)
    for call in (lambda: probe(flood), lambda: resize(flood, Params(width=8))):
        with pytest.raises(CorruptImage, match="scans"):
            call()


def test_what_follows_a_jpegs_end_is_not_counted_as_scans(monkeypatch):
    """A motion photo carries its video after the JPEG's end. Scans were counted as FF DA pairs to the
    end of the file, about one in every 64 KiB of such data: a photo with a ~17 MB video was refused
    as corrupt_image (found by review)."""
    photo = encode(Image.new("RGB", (64, 48), "red"), "JPEG", progressive=True)
    trailer = random.Random(7).randbytes(300 * 65_536)  # ~300 FF DA pairs by chance: more than the bound
    assert trailer.count(b"\xff\xda") > 256
    assert probe(photo + trailer).width == 64
    # The scans themselves are still counted, wherever the end of the image is.
    with pytest.raises(CorruptImage, match="scans"):
        probe(_jpeg_of_scans(300) + trailer)


def _jpeg_with_junk(junk: bytes) -> bytes:
    """A small JPEG with `junk` between its APP0 segment and the next."""
    good = encode(Image.new("RGB", (8, 8), "red"), "JPEG")
    cut = 4 + int.from_bytes(good[4:6], "big")
    return good[:cut] + junk + good[cut:]


@pytest.mark.parametrize("junk,times", [(b"\x00", 1_000_000), (b"\xff\x00", 500_000),
                                        (b"\x00\xff\xfe\x00\x02", 2_000)])  # junk hid a segment flood
def test_junk_between_jpeg_segments_is_refused_before_pillow_walks_it(junk, times, monkeypatch):
    """_jpeg_check stopped at the first byte that is not 0xFF, and Pillow skips such junk (and FF 00)
    one byte per Python loop: 26 MB of zeros cost ~1.7 s of the API's CPU in probe()."""
    assert probe(_jpeg_with_junk(junk * 20)).width == 8  # a little junk is read past, as libjpeg does
    assert probe(_jpeg_with_junk(b"\x00" * 60_000)).width == 8

    def walk(self):
        raise AssertionError("Pillow walked the header")
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "_open", walk)
    with pytest.raises(CorruptImage):
        probe(_jpeg_with_junk(junk * times))


def _png_rows(im: Image.Image, *, interlace: bool = False, rows: int | None = None) -> bytes:
    """The filtered rows (filter 0) of an 8-bit RGB PNG of `im`, Adam7-interlaced if asked, cut after
    the first `rows` rows (of all passes)."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    rgb = im.convert("RGB")
    lines = []
    for x0, y0, dx, dy in passes if interlace else ((0, 0, 1, 1),):
        for y in range(y0, im.height, dy):
            row = b"".join(bytes(rgb.getpixel((x, y))) for x in range(x0, im.width, dx))
            lines += [b"\0" + row] if row else []
    return b"".join(lines[:rows])


def _raw_png(im: Image.Image, *, interlace: bool = False, rows: int | None = None) -> bytes:
    """An 8-bit RGB PNG of `im`, written here (Pillow writes no interlaced PNG): Adam7-interlaced if
    asked, its image data cut after its first `rows` rows (of all passes; a complete zlib stream)."""
    header = struct.pack(">IIBBBBB", im.width, im.height, 8, 2, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(_png_rows(im, interlace=interlace, rows=rows))) + png_chunk(b"IEND", b""))


def _raw_apng(size: tuple[int, int], frames: list[tuple[int, int, Image.Image, int, int]], *, interlace: bool = False,
              default_image: bool = False, short: int | None = None, rows: int | None = None) -> bytes:
    """An 8-bit RGB APNG written here (Pillow writes no interlaced PNG): each frame (x, y, image, dispose_op,
    blend_op), the first in IDAT unless `default_image` (a grey still in IDAT, not a frame), the others in
    two fdAT chunks each; frame `short`'s data cut after its first `rows` rows (a complete zlib stream)."""
    header = struct.pack(">IIBBBBB", *size, 8, 2, 0, 0, int(interlace))
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"acTL", struct.pack(">II", len(frames), 0))
    if default_image:
        out += png_chunk(b"IDAT", zlib.compress(_png_rows(Image.new("RGB", size, (99, 99, 99)), interlace=interlace)))
    sequence = 0
    for index, (x, y, im, dispose, blend) in enumerate(frames):
        out += png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, im.width, im.height, x, y, 1, 10, dispose, blend))
        sequence += 1
        stream = zlib.compress(_png_rows(im, interlace=interlace, rows=rows if index == short else None))
        if index == 0 and not default_image:
            out += png_chunk(b"IDAT", stream)
            continue
        for part in (stream[:len(stream) // 2], stream[len(stream) // 2:]):
            out += png_chunk(b"fdAT", struct.pack(">I", sequence) + part)
            sequence += 1
    return out + png_chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (5, 9), (17, 13), (64, 48)])
@pytest.mark.parametrize("interlace", [False, True])
def test_a_png_whose_image_data_is_short_is_refused_and_a_whole_one_is_not(size, interlace):
    """The zlib stream was complete but ended after half the rows, at a row's end: Pillow filled the
    rest with black and the engine answered 200 with it (libpng, hence sharp, refuses such a file; a
    stream cut inside a row Pillow did refuse). Interlaced files, whose passes are counted apart (some
    empty at small sizes), must not be refused when whole."""
    picture = Image.effect_noise(size, 60).convert("RGB")
    whole = decode(resize(_raw_png(picture, interlace=interlace), Params(width=size[0], format="png")).data)
    assert ImageChops.difference(whole.convert("RGB"), picture).getbbox() is None
    black_bottom = picture.copy()  # the data is inflated again only when the last row is blank: whole, it passes
    black_bottom.paste((0, 0, 0), (0, size[1] - 2, size[0], size[1]))
    resize(_raw_png(black_bottom, interlace=interlace), Params(width=size[0], format="png"))
    if size != (1, 1):
        with pytest.raises(CorruptImage):
            resize(_raw_png(picture, interlace=interlace, rows=size[1] // 2), Params(width=size[0], format="png"))


@pytest.mark.parametrize("default_image", [False, True])
@pytest.mark.parametrize("blend", [0, 1])  # APNG_BLEND_OP_SOURCE, _OVER
def test_an_apng_frame_whose_image_data_is_short_is_refused_and_a_whole_one_is_not(monkeypatch, default_image, blend):
    """A later APNG frame's zlib stream (fdAT) complete but ended after half its rows: Pillow left the
    rows it never reached as the canvas held them (the frame before) without a word, and the engine
    answered with it (libpng refuses such a file); only the IDAT image was checked. The frames: a whole
    one, a smaller one at an offset, a whole one, and one whose last row is the frame before's (only
    there is the data inflated again, and a whole file passes). `default_image`: the IDAT image is a
    still fallback, not a frame, and every frame is in fdAT chunks."""
    noise = Image.effect_noise((24, 16), 60).convert("RGB")
    gradient = Image.linear_gradient("L").resize((24, 16)).convert("RGB")
    top_changed = gradient.copy()
    top_changed.paste((200, 30, 30), (0, 0, 24, 8))
    frames = [(0, 0, noise, 0, blend), (5, 3, gradient.crop((0, 0, 11, 9)), 0, blend), (0, 0, gradient, 0, blend),
              (0, 0, top_changed, 0, blend)]
    inflated = []
    check = imaging._png_data_short
    monkeypatch.setattr(imaging, "_png_data_short", lambda data, frame=0: inflated.append(frame) or check(data, frame))
    whole = _apng_frames(resize(_raw_apng((24, 16), frames, default_image=default_image),
                                Params(width=24, format="png")).data)
    assert len(whole) == 4 and ImageChops.difference(whole[3].convert("RGB"), top_changed).getbbox() is None
    assert inflated == [4 if default_image else 3]  # the frame whose last row stayed
    for short in range(0 if default_image else 1, 4):
        data = _raw_apng((24, 16), frames, default_image=default_image, short=short, rows=frames[short][2].height // 2)
        with pytest.raises(CorruptImage, match="APNG frame .* image data is short"):
            resize(data, Params(width=24, format="png"))
    assert resize(data, Params(width=24, format="jpeg")).output.frames == 1  # a still: the later frames are not decoded


def test_an_interlaced_animated_png_is_refused_as_unsupported_not_as_corrupt():
    """Pillow cannot decode an interlaced APNG's later frames: the file is valid, so the answer says what
    cannot be done (415), not that the customer's file is broken (it was `corrupt_image`). An interlaced
    still PNG, and an APNG without interlacing, are read."""
    frames = [(0, 0, Image.effect_noise((24, 16), 60).convert("RGB"), 0, 0),
              (0, 0, Image.linear_gradient("L").resize((24, 16)).convert("RGB"), 0, 0)]
    with pytest.raises(UnsupportedImage, match="interlaced animated PNG"):
        resize(_raw_apng((24, 16), frames, interlace=True), Params(width=24, format="png"))
    assert len(_apng_frames(resize(_raw_apng((24, 16), frames), Params(width=24, format="png")).data)) == 2
    assert resize(_raw_png(frames[0][2], interlace=True), Params(width=12, format="png")).output.width == 12


_GIF_COLOURS = [10, 10, 200, 220, 10, 10, 10, 220, 10, 250, 250, 250]  # blue, red, green, white


def _gif_of(screen: tuple[int, int], frames: list[tuple[int, int, Image.Image, int | None, int]],
            grey: bool = False) -> bytes:
    """A GIF of a `screen`-sized logical screen and the given frames, each (x, y, image of palette
    indices, its transparent index or None, its disposal method), with a global palette of blue, red,
    green and white (`grey`: the identity greys 0-7, which Pillow reads as mode L)."""
    blocks = b""
    for x, y, indices, clear, disposal in frames:
        patch = indices.copy()
        patch.putpalette(_GIF_COLOURS + [0] * (768 - len(_GIF_COLOURS)))
        written = encode(patch, "GIF", optimize=False)  # optimized, the patch's colours were renumbered
        at = 13 + (3 << ((written[10] & 7) + 1) if written[10] & 0x80 else 0)
        while written[at] == 0x21:  # extensions: label, then sub-blocks
            at += 2
            while written[at]:
                at += written[at] + 1
            at += 1
        image = bytearray(written[at:-1])
        image[1:5] = struct.pack("<HH", x, y)
        flags = disposal << 2 | (clear is not None)
        blocks += b"\x21\xf9\x04" + bytes([flags, 0x0a, 0x00, clear or 0, 0]) + bytes(image)  # 0.1 s a frame
    width, height = screen
    table = bytes(v for i in range(8) for v in (i, i, i)) if grey else bytes(_GIF_COLOURS) + bytes(3 * 4)  # 8 entries
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x82, 0, 0) + table
            + b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00" + blocks + b";")


def _gif_of_patches(screen: tuple[int, int], patches: list[tuple[int, int, int]]) -> bytes:
    """A GIF of a `screen`-sized logical screen whose frames are 20x20 patches of palette colour
    `index` at (x, y), none with a transparent index, each kept (disposal 1)."""
    return _gif_of(screen, [(x, y, Image.new("P", (20, 20), index), None, 1) for x, y, index in patches])


def test_a_gif_screen_no_frame_has_painted_is_transparent():
    """A first frame smaller than the logical screen, without a transparent index: browsers show the
    rest of the screen transparent, Pillow filled it with palette index 0, and the engine made it an
    opaque blue border. Later frames paint over it where they fall; the rest stays transparent."""
    still = _gif_of_patches((60, 40), [(10, 10, 1)])
    out = decode(resize(still, Params(width=60, format="png")).data).convert("RGBA")
    assert out.getpixel((2, 2))[3] == 0 and out.getpixel((20, 20)) == (220, 10, 10, 255)
    flat = decode(resize(still, Params(width=60, format="jpeg", background="ffffff")).data)
    assert all(v > 240 for v in flat.getpixel((2, 2)))  # flattened on the background, not blue
    moving = _gif_of_patches((60, 40), [(10, 10, 1), (35, 10, 2)])
    animation = Image.open(io.BytesIO(resize(moving, Params(width=60, format="webp")).data))
    assert animation.n_frames == 2
    animation.seek(1)
    second = animation.convert("RGBA")
    assert second.getpixel((2, 2))[3] == 0 and second.getpixel((58, 38))[3] == 0
    assert second.getpixel((20, 20))[:3] == pytest.approx((220, 10, 10), abs=12) and second.getpixel((20, 20))[3] == 255
    assert second.getpixel((45, 20))[:3] == pytest.approx((10, 220, 10), abs=12) and second.getpixel((45, 20))[3] == 255
    whole = encode(Image.new("P", (60, 40), 1), "GIF")  # a first frame the size of the screen: nothing cleared
    assert decode(resize(whole, Params(width=60, format="png")).data).mode == "RGB"


def _apng_frames(data: bytes) -> list[Image.Image]:
    """Each frame of an animated PNG as it is shown (Pillow composites them), in RGBA."""
    im = Image.open(io.BytesIO(data))
    frames = []
    for index in range(im.n_frames):
        im.seek(index)
        frames.append(im.convert("RGBA"))
    return frames


def _half(size: tuple[int, int], left: int, right: int) -> Image.Image:
    """Palette indices: the left half `left`, the right half `right`."""
    patch = Image.new("P", size, right)
    patch.paste(left, (0, 0, size[0] // 2, size[1]))
    return patch


@pytest.mark.parametrize("grey", [False, True])
def test_a_later_gif_frame_s_transparent_pixels_over_unpainted_screen_stay_transparent(grey):
    """The second frame's left half is its transparent index, over screen the first frame never
    painted: browsers show it transparent; Pillow left its fill there (palette index 0) and the engine
    counted the whole of the frame's rectangle as painted, an opaque blue (or black) block. Grey: a
    palette of identity greys, which Pillow decodes as mode L (as it writes a greyscale GIF)."""
    data = _gif_of((60, 40), [(10, 10, Image.new("P", (20, 20), 1), None, 1),
                              (34, 10, _half((20, 20), 3, 2), 3, 1)], grey=grey)
    first, second = _apng_frames(resize(data, Params(width=60, format="png")).data)
    painted = (1, 1, 1) if grey else (220, 10, 10)
    assert first.getpixel((2, 2))[3] == 0 and first.getpixel((38, 20))[3] == 0
    assert second.getpixel((2, 2))[3] == 0
    assert second.getpixel((20, 20)) == (*painted, 255)  # the first frame's, kept
    assert second.getpixel((38, 20))[3] == 0  # the second frame's transparent half: nothing painted there
    assert second.getpixel((50, 20)) == ((2, 2, 2) if grey else (10, 220, 10)) + (255,)


@pytest.mark.parametrize("grey", [False, True])
@pytest.mark.parametrize("first_has_a_transparent_index", [False, True])
def test_a_gif_frame_disposed_to_the_background_is_cleared_to_transparent(grey, first_has_a_transparent_index):
    """Disposal 2 on a frame without a transparent index: browsers (Chrome, Firefox) clear its rectangle
    to transparent; Pillow fills it with the background colour (palette index 0, opaque), which the
    engine passed on. A red screen, a green patch disposed to the background, then a blue patch
    elsewhere: where the green patch was is transparent in the third frame. With the first frame
    opaque, Pillow's frames have no alpha at all (RGB); with a transparent index, they have it. The
    first frame disposed to the background, or to what was there before it (nothing), likewise."""
    data = _gif_of((40, 20), [(0, 0, Image.new("P", (40, 20), 1), 3 if first_has_a_transparent_index else None, 1),
                              (0, 0, Image.new("P", (20, 20), 2), None, 2),
                              (30, 0, Image.new("P", (10, 10), 0), None, 1)], grey=grey)
    frames = _apng_frames(resize(data, Params(width=40, format="png")).data)
    red, green, blue = ((1, 1, 1), (2, 2, 2), (0, 0, 0)) if grey else ((220, 10, 10), (10, 220, 10), (10, 10, 200))
    assert [f.getpixel((10, 10)) for f in frames] == [(*red, 255), (*green, 255), (*frames[2].getpixel((10, 10))[:3], 0)]
    assert frames[2].getpixel((25, 15)) == (*red, 255) and frames[2].getpixel((35, 5)) == (*blue, 255)
    for disposal in (2, 3):  # the first frame's: to the background, or to what was before it (nothing)
        first_disposed = _gif_of((40, 20), [(0, 0, Image.new("P", (40, 20), 1), None, disposal),
                                            (0, 0, Image.new("P", (20, 20), 2), None, 1)], grey=grey)
        first, second = _apng_frames(resize(first_disposed, Params(width=40, format="png")).data)
        assert first.getpixel((30, 10)) == (*red, 255)
        assert second.getpixel((10, 10)) == (*green, 255) and second.getpixel((30, 10))[3] == 0


def test_a_gif_frame_s_disposal_is_its_own_not_carried_to_the_frames_after_it():
    """A Graphic Control Extension's scope is the one image after it (GIF89a, 23): a frame whose own
    disposal is 0 (unspecified) is left in place, as browsers do. Pillow kept the last non-zero disposal
    for the frames after it, so a frame after one disposed to the background was cleared too. A red
    screen, a green patch disposed to the background, a blue patch with disposal 0, then a white patch
    elsewhere: in the last frame the blue patch is still there."""
    data = _gif_of((40, 20), [(0, 0, Image.new("P", (40, 20), 1), None, 1),
                              (0, 0, Image.new("P", (10, 10), 2), None, 2),
                              (20, 0, Image.new("P", (10, 10), 0), None, 0),
                              (30, 10, Image.new("P", (10, 10), 3), None, 0)])
    frames = _apng_frames(resize(data, Params(width=40, format="png")).data)
    assert len(frames) == 4
    assert frames[2].getpixel((5, 5))[3] == 0  # the green patch, disposed to the background
    assert frames[3].getpixel((25, 5)) == (10, 10, 200, 255)  # the blue patch, kept
    assert frames[3].getpixel((35, 15)) == (250, 250, 250, 255) and frames[3].getpixel((5, 15)) == (220, 10, 10, 255)


def _browser_frames(screen: tuple[int, int], frames: list[tuple[int, int, Image.Image, int | None, int]]
                    ) -> list[Image.Image]:
    """The frames as a browser composites them (GIF89a; Chrome, Firefox): a transparent screen; each
    frame drawn where its pixels are not its transparent index, shown, then disposed by its own method:
    0 and 1 leave it, 2 clears its rectangle to transparent, 3 restores what was there before it."""
    colours = [tuple(_GIF_COLOURS[i:i + 3]) + (255,) for i in range(0, len(_GIF_COLOURS), 3)]
    canvas, shown = Image.new("RGBA", screen, (0, 0, 0, 0)), []
    for x, y, indices, clear, disposal in frames:
        before = canvas.copy()
        raw = indices.tobytes()
        patch = Image.frombytes("RGBA", indices.size, b"".join(bytes(colours[i]) for i in raw))
        mask = Image.frombytes("L", indices.size, bytes(0 if i == clear else 255 for i in raw))
        canvas.paste(patch, (x, y), mask)
        shown.append(canvas.copy())
        if disposal == 2:
            canvas.paste((0, 0, 0, 0), (x, y, x + indices.width, y + indices.height))
        elif disposal == 3:
            canvas = before
    return shown


def _visible(frames: list[Image.Image]) -> list[bytes]:
    """Frames as what they show (colour only where opaque), consecutive repeats merged (the writer merges
    them into one longer frame)."""
    shown: list[bytes] = []
    for frame in frames:
        rgba = frame.tobytes()
        data = b"".join(rgba[i:i + 4] if rgba[i + 3] else bytes(4) for i in range(0, len(rgba), 4))
        if not shown or shown[-1] != data:
            shown.append(data)
    return shown


@st.composite
def _gif_animations(draw: st.DrawFn) -> tuple[tuple[int, int], list[tuple[int, int, Image.Image, int | None, int]]]:
    width, height = draw(st.integers(4, 24)), draw(st.integers(4, 24))
    frames = []
    for _ in range(draw(st.integers(1, 5))):
        w, h = draw(st.integers(1, width)), draw(st.integers(1, height))
        x, y = draw(st.integers(0, width - w)), draw(st.integers(0, height - h))
        indices = Image.new("P", (w, h), draw(st.integers(0, 3)))
        for _ in range(draw(st.integers(0, 2))):  # a block or two of other colours
            bw, bh = draw(st.integers(1, w)), draw(st.integers(1, h))
            bx, by = draw(st.integers(0, w - bw)), draw(st.integers(0, h - bh))
            indices.paste(draw(st.integers(0, 3)), (bx, by, bx + bw, by + bh))
        frames.append((x, y, indices, draw(st.none() | st.integers(0, 3)), draw(st.integers(0, 3))))
    return (width, height), frames


@settings(max_examples=300, deadline=None)
@given(animation=_gif_animations())
def test_gif_frames_are_composited_as_browsers_show_them(animation):
    """Random GIFs (frames anywhere on the screen, transparent indices or none, every disposal 0-3 mixed)
    resized to their own size: each frame as a browser model shows it (alpha, and colour where opaque)."""
    screen, frames = animation
    out = _apng_frames(resize(_gif_of(screen, frames), Params(width=screen[0], format="png")).data)
    assert _visible(out) == _visible(_browser_frames(screen, frames))


def test_a_later_grey_gif_frame_keeps_its_pixels_of_the_first_frame_s_transparent_grey():
    """A GIF of identity greys (Pillow's mode L, as it writes a greyscale GIF) whose first frame's
    transparent index is grey 1, then a frame without a transparent index, all grey 1: Pillow keeps the
    first frame's transparent grey for every frame of such a file, and the second frame came out
    transparent where browsers show it opaque."""
    data = _gif_of((20, 10), [(0, 0, _half((20, 10), 1, 2), 1, 1), (0, 0, Image.new("P", (20, 10), 1), None, 1)],
                   grey=True)
    first, second = _apng_frames(resize(data, Params(width=20, format="png")).data)
    assert first.getpixel((5, 5))[3] == 0 and first.getpixel((15, 5)) == (2, 2, 2, 255)
    assert second.getpixel((5, 5)) == (1, 1, 1, 255) and second.getpixel((15, 5)) == (1, 1, 1, 255)


def test_an_animated_avif_stays_an_animated_avif():
    """AVIF output was always a still: with no `format` an animated AVIF came back as WebP, and
    `format=avif` (or `auto` to a browser taking AVIF) gave the first frame of any animation."""
    frames = [Image.new("RGB", (32, 16), (i * 60, 0, 0)) for i in range(3)]
    animated = encode(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=[100, 200, 300])
    result = resize(animated, Params(width=16))
    assert result.input.frames == 3 and result.output.format == "avif" and result.output.frames == 3
    assert (decode(result.data).format, _delays(result.data)) == ("AVIF", [100, 200, 300])


@pytest.mark.parametrize("loop,frames", [(0, 2), (None, 1), (2, 1)])  # GIF's loop: repeats; None: plays once
def test_an_animation_becomes_an_animated_avif_only_when_it_plays_forever(loop, frames):
    """Pillow's AVIF writer sets no play count and what it writes repeats forever: a GIF that plays
    once or three times comes out as its first frame, not as an animation that never stops."""
    gif = _two_frames("GIF", duration=[0, 70], **({} if loop is None else {"loop": loop}))
    result = resize(gif, Params(width=10, format="avif"))
    assert result.output.format == "avif" and result.output.frames == frames
    fmt, durations = decode(result.data).format, _delays(result.data)
    # A 0 ms frame plays as browsers play it in the GIF: 100 ms (an AVIF's 0 is 1 ms, raced through).
    assert fmt == "AVIF" and (durations == [100, 70] if frames == 2 else len(durations) == 1)
    picked = resize(gif, Params(width=10, format="auto", accept=("avif", "webp")))
    assert (picked.output.format, picked.output.frames) == (("avif", 2) if loop == 0 else ("webp", 2))
