"""One request id per request: taken from `X-Request-Id` (if sane) or generated, echoed on the response;
and a database failure in a view outside DRF answered as the API answers it."""
from __future__ import annotations

import re
import uuid
from typing import Callable

from django.http import HttpRequest, HttpResponse

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # whole: fullmatch (`$` let "id\n" through)


def request_id_for(incoming: str) -> str:
    """The client's X-Request-Id if it is sane, else a new one."""
    return incoming if _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


class RequestIdMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.request_id = request_id_for(request.headers.get("X-Request-Id", ""))  # type: ignore[attr-defined]
        response = self.get_response(request)
        response["X-Request-Id"] = request.request_id  # type: ignore[attr-defined]
        return response

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view outside DRF (the admin's pages) whose database is away or too slow answers 503
        `database_unavailable`, as the API's views do (controlplane.errors), not a 500. Here, not in a
        middleware of its own: one more layer would cost every request."""
        from django.db import InterfaceError, OperationalError

        from controlplane.errors import database_unavailable

        if isinstance(exception, (OperationalError, InterfaceError)):
            return database_unavailable(exception)
        return None
