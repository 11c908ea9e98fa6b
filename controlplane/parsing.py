"""Turning an HTTP request into resize parameters and image bytes, with every refusal a clear error."""
from __future__ import annotations

from django.http import HttpRequest
from django.http.multipartparser import MultiPartParserError

from controlplane.errors import ApiError
from resizer import imaging

_INT_RANGES = {"width": (1, 8192), "height": (1, 8192), "quality": (1, 100)}
_CHOICES = {"fit": imaging.FITS, "format": (*imaging.FORMATS, "auto"), "gravity": imaging.GRAVITIES}
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
PARAMETERS = ("width", "height", "fit", "format", "quality", "gravity", "background", "enlarge")
# Room for the multipart envelope (boundaries, part headers) around a file at the size limit.
_MULTIPART_SLACK = 64 * 1024
_CHUNK = 256 * 1024


def _bad(name: str, sentence: str) -> ApiError:
    return ApiError(400, "invalid_parameter", sentence, extra={"parameter": name})


def accepted_formats(accept_header: str) -> tuple[str, ...]:
    """Output formats named in an Accept header with q > 0 (wildcards name none)."""
    formats = []
    for item in accept_header.split(","):
        media, *options = (part.strip() for part in item.split(";"))
        quality = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        kind, _, sub = media.lower().partition("/")
        if kind == "image" and sub in imaging.FORMATS and quality > 0:
            formats.append(sub)
    return tuple(formats)


def parse_params(query: dict[str, str], accept_header: str) -> imaging.Params:
    unknown = sorted(set(query) - set(PARAMETERS))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"Unknown query parameter {unknown[0]!r}; "
                       f"the parameters are {', '.join(PARAMETERS)}.", extra={"parameter": unknown[0]})
    values: dict[str, object] = {}
    for name, (low, high) in _INT_RANGES.items():
        if name in query:
            raw = query[name]
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise _bad(name, f"{name} must be a whole number from {low} to {high}, not {raw!r}.")
            values[name] = int(raw)
    for name, choices in _CHOICES.items():
        if name in query:
            if query[name] not in choices:
                raise _bad(name, f"{name} must be one of {', '.join(choices)}, not {query[name]!r}.")
            values[name] = query[name]
    if "enlarge" in query:
        if query["enlarge"].lower() not in _BOOLEANS:
            raise _bad("enlarge", f"enlarge must be true or false, not {query['enlarge']!r}.")
        values["enlarge"] = _BOOLEANS[query["enlarge"].lower()]
    if "background" in query:
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


def read_upload(request: HttpRequest, limit: int) -> bytes:
    """The image bytes of a raw or multipart body, refusing oversize bodies before reading them."""
    content_length = request.META.get("CONTENT_LENGTH") or ""
    declared = int(content_length) if content_length.isdigit() else None
    multipart = request.content_type == "multipart/form-data"
    if declared is not None and declared > limit + (_MULTIPART_SLACK if multipart else 0):
        raise _too_large(limit)
    if multipart:
        try:
            upload = request.FILES.get("image")
        except MultiPartParserError as e:
            raise ApiError(400, "malformed_multipart", f"The multipart body could not be parsed: {e}.") from e
        if upload is None:
            raise ApiError(400, "missing_image", "The multipart body has no file in the field 'image'.")
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit)
        data = upload.read()
    elif declared is None and "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
        # A streamed body: read only up to the limit, then refuse, never buffering the rest.
        stream = request.META["wsgi.input"]
        parts, size = [], 0
        while chunk := stream.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
        data = b"".join(parts)
    else:
        data = request.read()
    if not data:
        raise ApiError(400, "empty_body", "The request has no image: send its bytes as the body "
                       "or as the multipart field 'image'.")
    return data
