"""The API's WSGI application: Django's, behind three guards against clients that are broken or slow
on purpose (docs/RELIABILITY.md, "Slow and hostile clients")."""
import os
import socket
import time
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
_django = get_wsgi_application()

from django.conf import settings  # noqa: E402  (after Django is set up)
from django.http.cookie import parse_cookie  # noqa: E402

from controlplane.errors import ApiError, problem  # noqa: E402
from controlplane.middleware import request_id_for  # noqa: E402
from controlplane.parsing import (  # noqa: E402
    GUNICORN_RESPONSE,
    below_least_rate,
    body_left_unread,
    close_after_answer,
    has_body,
    read_other_body,
)
from identity.authentication import BEARER_CHALLENGE, SEND_A_KEY  # noqa: E402
from identity.dataplane import AuthFailed, AuthUnavailable, credential_cache  # noqa: E402

# The resize view reads its own body, streamed and bounded (controlplane/parsing.py read_upload).
_STREAMED_BODIES = frozenset({"/v1/resize"})
_WRITE_CHUNK = 256 * 1024


def application(environ: dict[str, Any], start_response: Any) -> Any:
    # gunicorn's Response (its start_response is a bound method of it): close_after_answer() asks it to
    # answer `Connection: close` when the body is left unread.
    environ[GUNICORN_RESPONSE] = getattr(start_response, "__self__", None)
    try:
        if _unsupported_coding(environ):
            _shut(environ.get("gunicorn.socket"), socket.SHUT_RD)  # its body is not read
            raise ApiError(501, "not_implemented", "The only transfer coding supported is chunked; send the "
                           "body as it is, with a Content-Length or chunked.")
        if environ.get("PATH_INFO") not in _STREAMED_BODIES:
            refused = _body_without_credentials(environ)
            if refused is not None:
                # Every /v1/ endpoint that takes a body wants credentials; without valid ones its body is
                # not waited for: read first, a keyless body trickled at the least rate held a thread for
                # up to OTHER_BODY_TIMEOUT_SECONDS (30 s), and such requests reach no customer's thread
                # count. Nor is it drained after the answer (gunicorn would, in this thread, for up to
                # 5 s): the connection's read side is shut, and gunicorn closes it.
                _shut(environ.get("gunicorn.socket"), socket.SHUT_RD)
                raise refused
            # Any body but a resize's (which the view streams, bounded) is read here, within the body
            # bounds: a login form trickled a byte every 20 s (a CSRF check reads the form before any
            # authentication) held a thread each, and 16 of them took a node out of the load balancer.
            read_other_body(environ)
    except ApiError as e:  # each about the body (its coding, its credentials, its pace or size): left unread
        close_after_answer(environ)
        return _answer(problem(e.status_code, e.code, str(e.detail), headers=e.headers, extra=e.extra),
                       environ, start_response)
    try:
        body = _django(environ, start_response)
    except ValueError:
        # A Content-Type Django cannot parse: it parses it while building the request, before any
        # middleware or error handler, so `image/png; a*=nope''x` (an RFC 2231 parameter in an unknown
        # charset) escaped as gunicorn's HTML 500.
        from django.utils.http import parse_header_parameters

        try:
            parse_header_parameters(environ.get("CONTENT_TYPE", ""))
        except ValueError:
            close_after_answer(environ)  # answered before any of the body is read
            return _answer(problem(400, "malformed_content_type", "The Content-Type header cannot be parsed."),
                           environ, start_response)
        raise
    if body_left_unread(environ):
        # Answered with the body unread by a path that did not say so (Django's own 400s: a Host it does
        # not serve, too many fields; a middleware's refusal): the connection closes after the answer.
        close_after_answer(environ)
    sock = environ.get("gunicorn.socket")
    file_wrapper = environ.get("wsgi.file_wrapper")
    if sock is None or (isinstance(file_wrapper, type) and isinstance(body, file_wrapper)):
        return body  # a static file (WhiteNoise) goes out by gunicorn's sendfile, unpaced
    return _PacedBody(body, sock)


def _unsupported_coding(environ: dict[str, Any]) -> bool:
    """Whether the body comes in a transfer coding besides chunked: gunicorn refuses most alone (`gzip`:
    400), but took `gzip, chunked`, undid the chunking only, and the view read the still gzipped bytes
    as the image (a plain body behind that header came out 200, a gzipped one 415)."""
    codings = environ.get("HTTP_TRANSFER_ENCODING")
    return codings is not None and [c.strip().lower() for c in codings.split(",") if c.strip()] != ["chunked"]


_PUBLIC_PATHS = frozenset({"/v1/openapi.json", "/v1/docs"})  # /v1/ paths that need no credentials
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": BEARER_CHALLENGE}  # as the views' 401s


def _body_without_credentials(environ: dict[str, Any]) -> ApiError | None:
    """The 401 for a request to the API (/v1/, but its public documents) with a body and no credentials:
    no Authorization header and no admin session cookie, or a Bearer key the process's snapshot does not
    know (checked from memory, as the view will). A Basic header (its password costs a PBKDF2, under the
    login caps) and a session cookie are not checked here: their bodies are read as before."""
    path = environ.get("PATH_INFO", "")
    if not has_body(environ) or not path.startswith("/v1/") or path in _PUBLIC_PATHS:
        return None
    scheme, _, key = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        try:
            credential_cache().authenticate(key.strip())
        except AuthFailed as e:
            if e.code != "customer_suspended":  # a suspended customer's 403 is the view's to give
                return ApiError(401, "unauthorized", e.detail, headers=_UNAUTHORIZED_HEADERS)
        except AuthUnavailable:
            pass  # the view answers 503 auth_unavailable
        return None
    if scheme or settings.SESSION_COOKIE_NAME in parse_cookie(environ.get("HTTP_COOKIE", "")):
        return None
    return ApiError(401, "unauthorized", SEND_A_KEY, headers=_UNAUTHORIZED_HEADERS)


def _shut(sock: socket.socket | None, how: int) -> None:
    """Shut the connection's reading (SHUT_RD) or both ways under gunicorn, which then closes it."""
    if sock is not None:
        try:
            sock.shutdown(how)
        except OSError:
            pass


def _answer(response: Any, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """An answer made here, before Django's middleware: with the request id it would have set."""
    response["X-Request-Id"] = request_id_for(environ.get("HTTP_X_REQUEST_ID", ""))
    response["Content-Length"] = str(len(response.content))
    start_response(f"{response.status_code} {HTTPStatus(response.status_code).phrase}", list(response.items()))
    return [response.content]


class _PacedBody:
    """The answer's body, written in pieces, each within RESPONSE_IDLE_TIMEOUT_SECONDS (a timeout on the
    socket, for gunicorn's write), all within RESPONSE_TIMEOUT_SECONDS, and past the first
    CLIENT_RATE_GRACE_SECONDS at CLIENT_MIN_BYTES_PER_SECOND on average; else the connection is
    closed. A client that never read its 17 MB result held a thread (and the result) until HAProxy's
    35 s timeout, and 16 of them took a node out of the load balancer."""

    def __init__(self, body: Iterable[bytes], sock: socket.socket) -> None:
        self._body, self._sock = body, sock

    def __iter__(self) -> Iterator[bytes]:
        previous = self._sock.gettimeout()
        start, sent = time.monotonic(), 0
        try:
            for item in self._body:
                for offset in range(0, max(len(item), 1), _WRITE_CHUNK):
                    elapsed = time.monotonic() - start
                    remaining = settings.RESPONSE_TIMEOUT_SECONDS - elapsed
                    if remaining <= 0 or below_least_rate(sent, elapsed):
                        self._cut()
                        return
                    self._sock.settimeout(min(settings.RESPONSE_IDLE_TIMEOUT_SECONDS, remaining))
                    piece = item[offset:offset + _WRITE_CHUNK] if len(item) > _WRITE_CHUNK else item
                    yield piece
                    sent += len(piece)
        finally:
            try:
                self._sock.settimeout(previous)
            except OSError:
                pass

    def _cut(self) -> None:
        """Close the connection under gunicorn: its next write fails as a client that went away."""
        _shut(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
