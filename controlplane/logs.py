"""Structured logs: one JSON object a line, and the request id of the request (API) or job (worker)
being served on every line, so one request can be followed from the API through its job.

The API sets the context from `request.request_id` (controlplane/middleware.py); the id rides to
the worker in the task message's headers (`request_id`), where the task sets the context again.
"""
from __future__ import annotations

import contextvars
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # gunicorn's master imports this module for its own log lines, before Django
    from django.http import HttpRequest, HttpResponse

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

# The message header that carries the request id to the worker.
TASK_HEADER = "request_id"


class ContextFilter(logging.Filter):
    """Adds `request_id` and `job_id` to every record logged while a request or job is served."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        job_id = job_id_var.get()
        if job_id is not None and not hasattr(record, "job_id"):
            record.job_id = job_id
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    formatter = JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )
    formatter.converter = time.gmtime  # type: ignore[assignment]
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    return formatter


class RequestLogContextMiddleware:
    """Sets the log context for the request's thread; put right after RequestIdMiddleware."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        token = request_id_var.set(getattr(request, "request_id", None))
        job_token = job_id_var.set(None)
        try:
            return self.get_response(request)
        finally:
            job_id_var.reset(job_token)
            request_id_var.reset(token)


# --- Celery: carry the id in the task message, restore it around the task ------------------------

def task_headers_add(headers: dict[str, Any]) -> None:
    """The publishing request's id into a task message's headers (resizer.services._send)."""
    request_id = request_id_var.get()
    if request_id is not None:
        headers.setdefault(TASK_HEADER, request_id)


def task_context_set(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    """task_prerun: the job's request id (from the headers) and job id (the task id) for its log lines."""
    request_id_var.set(getattr(getattr(task, "request", None), TASK_HEADER, None))
    job_id_var.set(task_id)


def task_context_clear(**_: Any) -> None:
    """task_postrun: the process's next log lines belong to no job."""
    request_id_var.set(None)
    job_id_var.set(None)
