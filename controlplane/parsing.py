"""Turning an HTTP request into resize parameters and image bytes, with every refusal a clear error."""
from __future__ import annotations

import heapq
import io
import itertools
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from django.core.exceptions import RequestDataTooBig, SuspiciousMultipartForm, TooManyFieldsSent, TooManyFilesSent
from django.core.files.uploadhandler import MemoryFileUploadHandler, TemporaryFileUploadHandler
from django.http.multipartparser import MultiPartParser, MultiPartParserError
from rest_framework.negotiation import BaseContentNegotiation

from controlplane.errors import ApiError
from controlplane.per_process import PerProcess
from resizer import imaging

_INT_RANGES = {"width": (1, 8192), "height": (1, 8192), "quality": (1, 100)}
_CHOICES = {"fit": imaging.FITS, "format": (*imaging.FORMATS, "auto"), "gravity": imaging.GRAVITIES}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
PARAMETERS = ("width", "height", "fit", "format", "quality", "gravity", "background", "enlarge")
# Room for the multipart envelope (boundaries, part headers) around a file at the size limit.
_MULTIPART_SLACK = 64 * 1024
_CHUNK = 256 * 1024
try:  # what gunicorn's reader raises for a chunked body it cannot parse (size lines, terminators)
    from gunicorn.http.errors import ParseException as _FRAMING_ERRORS
except ImportError:  # pragma: no cover - served by another WSGI server
    _FRAMING_ERRORS = ()  # type: ignore[assignment,misc]


class AcceptIsAnInput(BaseContentNegotiation):
    """DRF's negotiation answers 406 when Accept names no renderer, and our renderer is JSON only:
    `Accept: image/avif,image/webp` (what a CDN that normalises Accept sends with `format=auto`) or
    `Accept: image/*` on a result would be refused. Here Accept is an input to `format=auto`, images
    are answered directly, and JSON (jobs, problems) is the one representation of everything else."""

    def select_parser(self, request, parsers):  # type: ignore[no-untyped-def]
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):  # type: ignore[no-untyped-def]
        return renderers[0], renderers[0].media_type


def _bad(name: str, sentence: str) -> ApiError:
    return ApiError(400, "invalid_parameter", sentence, extra={"parameter": name})


def accepted_formats(accept_header: str) -> tuple[str, ...]:
    """Output formats named in an Accept header with q > 0, and "*" when a wildcard (image/*, */*) is;
    then `-name` for each format it refuses (named with q=0 only): format=auto never picks those, even
    where a wildcard accepts any image. Of AVIF and WebP, one the client rates strictly lower than the
    other is left out (format=auto otherwise prefers AVIF whatever the q-values: `image/avif;q=0.1,
    image/webp` got AVIF); WebP left out so stays as `~webp`, taken where AVIF cannot serve (an
    animation that plays a set number of times: AVIF output would be its first frame)."""
    qualities: dict[str, float] = {}
    refused: set[str] = set()
    for item in accept_header.split(","):
        media, *options = (part.strip() for part in item.split(";"))
        quality = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":  # parameter names are case-insensitive: Q=0 refuses too
                # Read leniently, kept within 0..1; what is no number (garbage, nan: float() took
                # "nan", which is not <= 0, so q=nan ranked first) is a refusal.
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
                quality = min(1.0, quality) if math.isfinite(quality) or quality > 0 else 0.0
        kind, _, sub = media.lower().partition("/")
        if quality <= 0:
            if kind == "image" and sub in imaging.FORMATS:
                refused.add(sub)
            continue
        if (kind, sub) in (("image", "*"), ("*", "*")):
            qualities["*"] = max(quality, qualities.get("*", 0.0))
        elif kind == "image" and sub in imaging.FORMATS:
            qualities[sub] = max(quality, qualities.get(sub, 0.0))
    avif, webp = qualities.get("avif"), qualities.get("webp")
    second = ()
    if avif is not None and webp is not None:
        qualities.pop("avif" if avif < webp else "webp" if webp < avif else "", None)
        second = ("~webp",) if webp < avif else ()
    return tuple(qualities) + second + tuple(f"-{name}" for name in sorted(refused - set(qualities)))


def single_values(query: Any) -> dict[str, str]:
    """The query's parameters, each given once (a QueryDict): `?width=abc&width=100` was read as its
    last value, so the same request passed or failed by the order of its duplicates."""
    values: dict[str, str] = {}
    for name, given in query.lists():
        if len(given) > 1:
            raise _bad(name, f"{name} is given {len(given)} times; give it once.")
        values[name] = given[0]
    return values


def refuse_unknown(query: Iterable[str], known: Iterable[str], hint: str) -> None:
    """400 `unknown_parameter` for the first (by name) query parameter not in `known`; `hint` says what is."""
    unknown = sorted(set(query) - set(known))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"Unknown query parameter {unknown[0]!r}; {hint}.",
                       extra={"parameter": unknown[0]})


def parse_params(query: dict[str, str], accept_header: str) -> imaging.Params:
    refuse_unknown(query, PARAMETERS, f"the parameters are {', '.join(PARAMETERS)}")
    values: dict[str, object] = {}
    for name, (low, high) in _INT_RANGES.items():
        if name in query:
            raw = query[name]
            # isdigit() alone passes "²" or "٣" (and int() of 5,000 digits raises): ASCII, 5 digits at most.
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 5) or not low <= int(raw) <= high:
                raise _bad(name, f"{name} must be a whole number from {low} to {high}, not {raw!r}.")
            values[name] = int(raw)
    for name, choices in _CHOICES.items():
        if name in query:
            value = query[name].lower()  # as enlarge's true/false: `fit=Cover` was a 400
            if value not in choices:
                raise _bad(name, f"{name} must be one of {', '.join(choices)}, not {query[name]!r}.")
            values[name] = value
    if "enlarge" in query:
        if query["enlarge"].lower() not in _BOOLEANS:
            raise _bad("enlarge", f"enlarge must be true or false, not {query['enlarge']!r}.")
        values["enlarge"] = _BOOLEANS[query["enlarge"].lower()]
    if "background" in query:
        try:
            imaging.parse_background(query["background"])
        except imaging.InvalidParameters as e:
            raise _bad("background", "background must be a hex colour (rrggbb or rrggbbaa, with or without '#'), "
                       f"not {query['background']!r}.") from e
        values["background"] = query["background"]
    if "width" not in values and "height" not in values:
        raise _bad("width", "Give width, height, or both (whole numbers from 1 to 8192).")
    params = imaging.Params(accept=accepted_formats(accept_header), **values)  # type: ignore[arg-type]
    try:
        imaging.validate(params)
    except imaging.InvalidParameters as e:
        raise ApiError(400, e.code, e.message) from e
    return params


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "payload_too_large", f"The image is larger than the limit of {limit} bytes.",
                    extra={"limit_bytes": limit})


def _upload_timeout() -> ApiError:
    return ApiError(408, "upload_timeout", "The image did not arrive in time; send the body without pauses.")


class _Cutter:
    """One thread per process that cuts the reading side of connections whose upload ran past its
    deadline: a client trickling its body just fast enough to beat every per-read timeout still has
    its reads end (EOF) at the deadline, and gets its 408."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: list[tuple[float, int]] = []  # a heap of (deadline, ticket)
        self._socks: dict[int, socket.socket] = {}
        self._deadlines: dict[int, float] = {}  # each ticket's current deadline (older heap entries are stale)
        self._tickets = itertools.count()
        threading.Thread(target=self._run, name="upload-cutter", daemon=True).start()

    def watch(self, sock: socket.socket, deadline: float) -> int:
        with self._cond:
            ticket = next(self._tickets)
            self._socks[ticket] = sock
            self._schedule(ticket, deadline)
            return ticket

    def move(self, ticket: int, deadline: float) -> None:
        """A new deadline for a watched socket (earlier or later)."""
        with self._cond:
            if ticket in self._socks and deadline != self._deadlines.get(ticket):
                self._schedule(ticket, deadline)

    def _schedule(self, ticket: int, deadline: float) -> None:
        self._deadlines[ticket] = deadline
        heapq.heappush(self._due, (deadline, ticket))
        if self._due[0] == (deadline, ticket):  # only an earlier deadline than the one it sleeps on wakes it
            self._cond.notify()
        if len(self._due) > 64 + 4 * len(self._socks):  # mostly stale entries: drop them
            self._due = [entry for entry in self._due if self._deadlines.get(entry[1]) == entry[0]]
            heapq.heapify(self._due)

    def release(self, ticket: int) -> None:
        with self._cond:
            self._socks.pop(ticket, None)
            self._deadlines.pop(ticket, None)
            if len(self._due) > 64 + 4 * len(self._socks):  # mostly released entries: drop them
                self._due = [entry for entry in self._due if self._deadlines.get(entry[1]) == entry[0]]
                heapq.heapify(self._due)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._due and self._deadlines.get(self._due[0][1]) != self._due[0][0]:
                    heapq.heappop(self._due)  # released in time, or moved
                if not self._due:
                    self._cond.wait()
                    continue
                deadline, ticket = self._due[0]
                wait = deadline - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                heapq.heappop(self._due)
                self._deadlines.pop(ticket)
                sock = self._socks.pop(ticket)
                try:
                    sock.shutdown(socket.SHUT_RD)  # reads now end; the answer can still be written
                except OSError:
                    pass


# One per process: its thread does not survive a fork.
_upload_cutter = PerProcess(_Cutter)


class _BodyClock:
    """Bounds the reads of one body: each may wait UPLOAD_IDLE_TIMEOUT_SECONDS for data (a timeout on
    the connection's socket, gunicorn's), all of them together UPLOAD_TIMEOUT_SECONDS (the cutter),
    and after CLIENT_RATE_GRACE_SECONDS they must average CLIENT_MIN_BYTES_PER_SECOND, so a slow
    client cannot hold a thread (and an admission slot) for long: a body trickled at 1 KB/s held one
    for the whole 120 s, and a dozen such uploads filled a process. Outside gunicorn (tests) there is
    no socket. `request`: anything with the request's META (the WSGI environ), and where to note that
    the body was given up on (upload_refused)."""

    def __init__(self, request: Any, seconds: float | None = None) -> None:
        self.request = request
        self.sock: socket.socket | None = request.META.get("gunicorn.socket")
        total = settings.UPLOAD_TIMEOUT_SECONDS if seconds is None else seconds
        self.idle = min(settings.UPLOAD_IDLE_TIMEOUT_SECONDS, total)
        self.start = time.monotonic()
        self.end = self.start + total
        self.ticket: int | None = None  # the cutter's, while reading

    def arm(self, received: int = 0, wanted: int = 0) -> None:
        """Before a read of `wanted` more bytes, `received` so far: refuse a body already too late or too
        slow, and bound the read: each wait for data by the idle bound (the socket's timeout), the read
        as a whole by when those bytes are due at the least rate (the cutter: a read asks gunicorn for
        up to 256 KiB at once and returns only once they came, however slowly)."""
        now = time.monotonic()
        remaining = self.end - now
        elapsed = now - self.start
        if remaining <= 0:
            self.request.upload_refused = True  # nothing more to read from it
            raise _upload_timeout()
        rate = settings.CLIENT_MIN_BYTES_PER_SECOND
        if below_least_rate(received, elapsed):
            self.request.upload_refused = True
            raise ApiError(408, "upload_timeout", f"The body arrived at {received / elapsed / 1024:.1f} KB/s, below "
                           f"the {rate / 1024:.0f} KB/s the service waits for; send it without pauses.")
        if self.sock is not None:
            self.sock.settimeout(min(self.idle, remaining))
            if self.ticket is not None and rate:
                due = self.start + max(settings.CLIENT_RATE_GRACE_SECONDS, (received + wanted) / rate) + 0.001
                _upload_cutter().move(self.ticket, min(self.end, due))

    @contextmanager
    def reading(self) -> Iterator[None]:
        if self.sock is None:
            yield
            return
        previous = self.sock.gettimeout()
        ticket = self.ticket = _upload_cutter().watch(self.sock, self.end)
        try:
            self.arm()
            yield
        except OSError as e:  # Django wraps read errors in UnreadablePostError (an OSError)
            self.request.upload_refused = True  # type: ignore[attr-defined]
            if isinstance(e, TimeoutError) or isinstance(e.__cause__, TimeoutError) or time.monotonic() >= self.end:
                raise _upload_timeout() from e
            raise ApiError(400, "upload_incomplete", "The body ended before it was complete.") from e
        except _FRAMING_ERRORS as e:  # a chunked body's framing broken (or cut mid-chunk by the deadline)
            self.request.upload_refused = True  # type: ignore[attr-defined]
            if time.monotonic() >= self.end:
                raise _upload_timeout() from e
            raise ApiError(400, "malformed_body", f"The chunked body is malformed: {e}.") from e
        finally:
            self.ticket = None
            _upload_cutter().release(ticket)
            try:
                self.sock.settimeout(previous)
            except OSError:
                pass


def _read_chunks(read: Callable[[int], bytes], clock: _BodyClock, limit: int, expected: int | None) -> bytes:
    """Read a body chunk by chunk (`expected` bytes when known), refusing it past `limit`."""
    parts, size = [], 0
    while expected is None or size < expected:
        wanted = _CHUNK if expected is None else min(_CHUNK, expected - size)
        clock.arm(size, wanted)
        chunk = read(wanted)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        parts.append(chunk)
    if expected is not None and size < expected:
        clock.arm(size)  # 408 when the deadline cut it
        raise ApiError(400, "upload_incomplete", "The body ended before it was complete.")
    return b"".join(parts)


def _declared_length(request: HttpRequest) -> int | None:
    """The Content-Length when it is a plain ASCII number ("²" passes str.isdigit() but not int())."""
    content_length = request.META.get("CONTENT_LENGTH") or ""
    return int(content_length) if content_length.isascii() and content_length.isdigit() else None


def _framing(request: Any) -> tuple[int | None, bool]:
    """(the declared length, whether the body is chunked instead)."""
    declared = _declared_length(request)
    return declared, declared is None and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower()


def has_body(environ: dict[str, Any]) -> bool:
    """Whether the request declares a body: a length above 0, or chunked."""
    declared, chunked = _framing(SimpleNamespace(META=environ))
    return bool(declared) or chunked


def below_least_rate(moved: int, elapsed: float) -> bool:
    """Past its grace, a body arriving or an answer being read slower than CLIENT_MIN_BYTES_PER_SECOND
    on average (0: no such bound)."""
    rate = settings.CLIENT_MIN_BYTES_PER_SECOND
    return bool(rate) and elapsed > settings.CLIENT_RATE_GRACE_SECONDS and moved / elapsed < rate


def read_other_body(environ: dict[str, Any]) -> None:
    """Read a request's body (any but a resize's, which read_upload streams) whole, within
    OTHER_BODY_MAX_BYTES and the body clock's bounds (OTHER_BODY_TIMEOUT_SECONDS in all), and put it
    back in `environ` for Django to read from memory: Django's own reads have no timeout. Raises
    ApiError (413, 408, 400)."""
    request = SimpleNamespace(META=environ, upload_refused=False)
    declared, chunked = _framing(request)
    if not declared and not chunked:
        return
    limit = settings.OTHER_BODY_MAX_BYTES
    if declared is not None and declared > limit:
        raise ApiError(413, "payload_too_large", f"The body is larger than the limit of {limit} bytes.")
    clock = _BodyClock(request, settings.OTHER_BODY_TIMEOUT_SECONDS)
    with clock.reading():
        data = _read_chunks(environ["wsgi.input"].read, clock, limit, declared)
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))


def read_upload(request: HttpRequest, limit: int) -> bytes:
    """The image bytes of a raw or multipart body, refusing oversize bodies before reading them."""
    declared, chunked = _framing(request)
    multipart = request.content_type == "multipart/form-data"
    body_limit = limit + (_MULTIPART_SLACK if multipart else 0)
    if declared is not None and declared > body_limit:
        raise _too_large(limit)
    clock = _BodyClock(request)
    with clock.reading():
        if chunked:
            # A streamed body: read only up to the limit, then refuse, never buffering (or draining) the rest.
            request.upload_refused = True  # type: ignore[attr-defined]  # until it is read whole
            data = _read_chunks(request.META["wsgi.input"].read, clock, body_limit, None)
            request.upload_refused = False  # type: ignore[attr-defined]
        else:
            # Multipart too is read here, whole (Django's parser would take a body cut short, chunked,
            # as one with no file part), and then parsed from memory.
            data = _read_chunks(request.read, clock, body_limit, declared or 0)
    if multipart:
        # The body is handed over, not kept here: the file is copied out of it, and holding both the
        # body and the copies would raise the peak by a body per upload (25 MB at the limit).
        body = [data]
        del data
        data = _multipart_image(request, body, limit)
    if not data:
        raise ApiError(400, "empty_body", "The request has no image: send its bytes as the body "
                       "or as the multipart field 'image'.")
    return data


def _multipart_image(request: HttpRequest, body: list[bytes], limit: int) -> bytes:
    """The file in the field `image` of a multipart body read whole (`[body]`: taken from the list, so
    the body is freed once parsed)."""
    content_type = request.META.get("CONTENT_TYPE", "")
    # Django's parser matches the media type case-sensitively; the boundary keeps its case.
    _, separator, options = content_type.partition(";")
    raw = body.pop()
    boundary = _boundary(options)
    # A body without its closing delimiter was cut short: Django drops the unterminated part in silence,
    # and the answer said the field 'image' was missing. Looked for at the end (an epilogue is rare).
    closed = boundary is None or b"--" + boundary + b"--" in raw[-(len(boundary) + 4096):]
    meta = {**request.META, "CONTENT_TYPE": f"multipart/form-data{separator}{options}",
            "CONTENT_LENGTH": str(len(raw))}
    stream = io.BytesIO(raw)  # shares raw's buffer (read only)
    del raw
    try:
        # Handlers of its own, not the request's: the request's keep their copy of the file for the
        # request's whole life (the synchronous wait included), a second 25 MB at the limit.
        handlers = [MemoryFileUploadHandler(request), TemporaryFileUploadHandler(request)]
        fields, files = MultiPartParser(meta, stream, handlers, request.encoding).parse()
    except RequestDataTooBig as e:  # a form field (not a file) over DATA_UPLOAD_MAX_MEMORY_SIZE
        raise ApiError(413, "payload_too_large", "A form field of the multipart body is too large; send "
                       "only the file, in the field 'image'.") from e
    except (MultiPartParserError, SuspiciousMultipartForm, TooManyFieldsSent, TooManyFilesSent) as e:
        raise ApiError(400, "malformed_multipart", _multipart_error(e)) from e
    finally:
        stream.close()  # the body's last reference
    upload = files.get("image")
    if upload is None and not closed:
        raise ApiError(400, "malformed_multipart", "The multipart body ends before its closing delimiter "
                       "(--boundary--): it was cut short.")
    if upload is None:
        raise ApiError(400, "missing_image", "The multipart field 'image' holds text, not a file." if "image" in fields
                       else "The multipart body has no file in the field 'image'.")
    # Parameters in form fields were ignored, and of two images the last was resized, in silence.
    if fields:
        name = next(iter(fields))
        raise ApiError(400, "unknown_parameter", f"The multipart body has a field {name!r}: parameters belong "
                       "in the query string, and the body holds only the file, in the field 'image'.",
                       extra={"parameter": name})
    if set(files) - {"image"} or len(files.getlist("image")) > 1:
        raise ApiError(400, "malformed_multipart", "The multipart body must hold one file, in the field 'image'.")
    if upload.size is not None and upload.size > limit:
        raise _too_large(limit)
    try:
        return upload.read()
    finally:
        upload.close()


def _boundary(options: str) -> bytes | None:
    """The multipart boundary of a Content-Type's parameters, as bytes; None if there is none to read."""
    from django.utils.http import parse_header_parameters

    try:
        value = parse_header_parameters(f"multipart/form-data{options and ';' + options}")[1].get("boundary")
        return value.encode("latin-1") if value else None
    except (ValueError, UnicodeEncodeError):
        return None


def _multipart_error(e: Exception) -> str:
    """The sentence for a multipart body Django's parser refused: in the API's words. Its own messages
    named Django settings, ended in "..", or misled (bare LF line endings read as "Request max total
    header size exceeded")."""
    if isinstance(e, TooManyFieldsSent):
        return "The multipart body has too many fields; send only the file, in the field 'image'."
    if isinstance(e, TooManyFilesSent):
        return "The multipart body has too many files; send one, in the field 'image'."
    message = str(e)
    if "header size" in message:
        return ("A part's headers in the multipart body do not end: each ends with an empty line, and "
                "lines end with CRLF, not a bare LF.")
    if "boundary" in message.lower():
        return "The multipart boundary is not valid: 1 to 70 letters, digits, spaces and ()+_,-./:=? only."
    if "base64" in message:
        return "A part of the multipart body is not valid base64, as its Content-Transfer-Encoding says."
    return "The multipart body could not be parsed."


REFUSED_BODY_DISCARD_SECONDS = 2.0
GUNICORN_RESPONSE = "resizer.gunicorn_response"  # environ key: gunicorn's Response, set by controlplane.wsgi


class ContinueOnRead:
    """`wsgi.input` for a request that sent `Expect: 100-continue`: `100 Continue` goes out before its
    first read, not before the application runs (gunicorn sent it at once, so a client with a wrong key,
    over its rate or refused by admission control was told to send its 25 MB before hearing 401, 429 or
    503; curl asks so for every upload over 1 MB). A request answered without reading its body never
    invites it (`pending` stays True): its connection closes after the answer (close_after_answer)."""

    _CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

    def __init__(self, body: Any, sock: socket.socket) -> None:
        self._body, self._sock, self.pending = body, sock, True

    def _invite(self) -> None:
        if self.pending:
            self.pending = False
            self._sock.sendall(self._CONTINUE)

    def read(self, size: int | None = None) -> bytes:
        self._invite()
        return self._body.read(size)

    def readline(self, size: int | None = None) -> bytes:
        self._invite()
        return self._body.readline(size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        self._invite()
        return self._body.readlines(hint)

    def __iter__(self) -> Iterator[bytes]:
        self._invite()
        return iter(self._body)


def body_not_invited(environ: dict[str, Any]) -> bool:
    """Whether the client waits for `100 Continue` before sending its body (none was sent yet; a
    request without a body waits for nothing)."""
    return getattr(environ.get("wsgi.input"), "pending", False) is True and has_body(environ)


# gunicorn drains at most this much of an unread body after a keep-alive answer, then closes the
# connection (gunicorn.http.parser._DRAIN_MAX_BYTES in gunicorn 27).
GUNICORN_DRAIN_BYTES = 64 * 1024


def body_left_unread(environ: dict[str, Any]) -> bool:
    """Whether the request's body is left where gunicorn will not reuse the connection after the
    answer: never invited (Expect), or more of it unread than gunicorn drains."""
    if body_not_invited(environ):
        return True
    body = environ.get("wsgi.input")
    reader = getattr(getattr(body, "_body", body), "reader", None)  # gunicorn's Body: a LengthReader's rest
    left = getattr(reader, "length", 0)
    return isinstance(left, int) and left > GUNICORN_DRAIN_BYTES


def close_after_answer(environ: dict[str, Any]) -> None:
    """Have the answer say `Connection: close` (and gunicorn close the connection after it, undrained):
    for a request whose body is left unread. gunicorn closed such a connection all the same, after an
    answer that said `keep-alive`, and a client that reused it got a broken pipe (found by review)."""
    response = environ.get(GUNICORN_RESPONSE)
    if response is not None and hasattr(response, "force_close"):
        response.force_close()


def discard_unread_body(request: HttpRequest, limit: int) -> None:
    """Read and drop what is left of the body of a request answered before reading it all (refused
    early, or failed while parsing), when the body is at most `limit` bytes: the client then reads the
    answer and can reuse its connection. A larger body is left alone; the connection closes after
    the answer."""
    declared, chunked = _framing(request)
    if declared is None and not chunked:
        return
    if ((declared is not None and declared > limit) or getattr(request, "upload_refused", False)
            or body_not_invited(request.META)):  # never invited: not asked for now either
        close_after_answer(request.META)
        return
    # A short budget of its own: the answer waits for the discard, and a refused request (no key,
    # over its rate, shed) must not hold a thread for an upload's allowance by trickling its body.
    clock = _BodyClock(request, REFUSED_BODY_DISCARD_SECONDS)
    read = request.META["wsgi.input"].read if chunked else request.read
    try:
        with clock.reading():
            _read_chunks(read, clock, limit, None)  # what is left; reads end at the body's end
    except Exception:  # over the limit, timed out, the client gone: the connection closes
        close_after_answer(request.META)
