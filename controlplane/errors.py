"""The one error format of the API: RFC 9457 problem+json with a stable machine-readable `code`."""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import Any

import psycopg
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.debug import SafeExceptionReporterFilter
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions

from resizer.staging import StagingError

log = logging.getLogger(__name__)


class SettingsFilter(SafeExceptionReporterFilter):
    """DEBUG's error page and error mails with URLs hidden too: Django hides settings and request
    variables named like keys and passwords, and showed DATABASE_URL and METERING_DATABASE_URL, each
    with its password (found by the security review; an environment's BROKER_URL too, under runserver)."""

    hidden_settings = re.compile("API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE|URL|URI|DSN|CONN", flags=re.I)

PROBLEM_TYPE_BASE = "https://docs.resizer.example/problems/"
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}


class ApiError(exceptions.APIException):
    """An error the customer can act on: an HTTP status, a stable `code`, and a sentence."""

    def __init__(self, status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail=detail, code=code)
        self.status_code = status
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
            extra: dict[str, Any] | None = None) -> HttpResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
        **(extra or {}),
    }
    response = JsonResponse(body, status=status, content_type="application/problem+json")
    if status != 500:
        # An answer we chose (a refusal, a shed 503) is not an event for django.request to log again
        # (a WARNING or ERROR line per refusal, without the request id, on the shedding path); a 500
        # is logged where it happened, with its traceback.
        response._has_been_logged = True  # type: ignore[attr-defined]
    for name, value in (headers or {}).items():
        response[name] = value
    return response


def get_only(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """A plain Django view (outside DRF: /healthz, /readyz, /metrics) that answers GET and HEAD, and
    anything else with a 405 problem and Allow. Until 2026-11-22 a POST to one of them met Django's
    CSRF check first: a 403 HTML page."""

    @csrf_exempt
    @functools.wraps(view)
    def get_or_405(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return problem(405, "method_not_allowed", f"Method \"{request.method}\" is not allowed here; use GET.",
                           headers={"Allow": "GET, HEAD"})
        return view(request, *args, **kwargs)

    return get_or_405


# DRF's own exceptions, mapped to our stable codes.
_DRF_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.NotAuthenticated: "unauthorized",
    exceptions.AuthenticationFailed: "unauthorized",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ParseError: "malformed_request",
    exceptions.ValidationError: "invalid_parameter",
}


def database_unavailable(exc: Exception) -> HttpResponse:
    """503 for a database that is away, or did not answer within the API's bounds
    (DATABASE_STATEMENT_TIMEOUT_SECONDS / DATABASE_LOCK_TIMEOUT_SECONDS)."""
    log.warning("database unavailable: %s", exc)
    slow = isinstance(exc.__cause__, (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable))
    return problem(503, "database_unavailable", "The database did not answer in time; retry shortly." if slow
                   else "The database cannot be reached right now; retry shortly.", headers={"Retry-After": "5"})


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponse | None:
    if isinstance(exc, ApiError):
        return problem(exc.status_code, exc.code, str(exc.detail), headers=exc.headers, extra=exc.extra)
    if isinstance(exc, StagingError):  # wherever the store failed: reading a job, waiting, a result
        return problem(503, "staging_unavailable", "The staging store cannot be read right now; retry shortly.",
                       headers={"Retry-After": "1"})
    if isinstance(exc, (OperationalError, InterfaceError)):  # Postgres away: usage, the management API
        return database_unavailable(exc)
    from rest_framework.views import exception_handler as drf_exception_handler  # DRF imports us first

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # not an API error: Django's 500 handler answers (also problem+json)
    code = next((c for t, c in _DRF_CODES.items() if isinstance(exc, t)), "error")
    detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
    if not isinstance(detail, str):
        detail = str(detail)
    headers = {k: v for k, v in response.items() if k in ("WWW-Authenticate", "Retry-After", "Allow")}
    return problem(response.status_code, code, detail, headers=headers)


def handler404(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return problem(404, "not_found", f"There is nothing at {request.path}.")


def handler500(request: HttpRequest) -> HttpResponse:
    return problem(500, "internal_error", "The server failed to answer; the request id identifies it in our logs.")


def handler400(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    from django.core.exceptions import DisallowedHost, TooManyFieldsSent

    if isinstance(exception, TooManyFieldsSent):  # over DATA_UPLOAD_MAX_NUMBER_FIELDS: query or form
        return problem(400, "malformed_request", "The request has too many parameters or form fields.")
    if isinstance(exception, DisallowedHost):
        return problem(400, "malformed_request", "The Host header names no host this API serves.")
    return problem(400, "malformed_request", "The request could not be understood.")
