"""The customer REST API: thin views over resizer.services and resizer.jobs."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, BinaryIO

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.views import APIView

from controlplane import admission, draining, metrics
from controlplane.errors import ApiError, problem
from controlplane.parsing import discard_unread_body, parse_params, read_upload, refuse_unknown, single_values
from identity.authentication import monthly_quota_charge, monthly_quota_refund
from identity.dataplane import credential_cache
from resizer import broker_alarm, imaging
from resizer.jobs import FAILED, SUCCEEDED, IdempotencyConflict, Job, job_load, job_result_open
from resizer.notify import JobWaiter, job_waiter
from resizer.services import QueueUnavailable, engine_limits, job_replay, job_submit
from resizer.staging import StagingError, StagingNotFound, staging_store

# Re-read intervals when no completion notice can reach this request (see _wait_polling).
_POLL_SECONDS = (0.02, 0.05, 0.1, 0.2, 0.5)

JOB_SCHEMA = inline_serializer(
    "Job",
    {
        "id": serializers.CharField(),
        "status": serializers.ChoiceField(choices=["queued", "running", "succeeded", "failed"]),
        "params": serializers.DictField(),
        "input": serializers.DictField(),
        "output": serializers.DictField(allow_null=True),
        "error": serializers.DictField(allow_null=True),
        "created_at": serializers.DateTimeField(),
        "started_at": serializers.DateTimeField(allow_null=True),
        "finished_at": serializers.DateTimeField(allow_null=True),
        "result_expires_at": serializers.DateTimeField(allow_null=True),
        "request_id": serializers.CharField(),
    },
)
PROBLEM = OpenApiResponse(
    inline_serializer("Problem", {
        "type": serializers.CharField(), "title": serializers.CharField(), "status": serializers.IntegerField(),
        "detail": serializers.CharField(help_text="a sentence for people"),
        "code": serializers.CharField(help_text="stable, for programs (the README lists them)"),
    }),
    description="RFC 9457 problem details; some carry more members (`parameter`, `job_id`, `limit_bytes`, ...)")


def problems(*statuses: int) -> dict[tuple[int, str], OpenApiResponse]:
    """The error answers of an operation, each as application/problem+json."""
    return {(status, "application/problem+json"): PROBLEM for status in statuses}


def response_header(name: str, statuses: list[int], description: str) -> OpenApiParameter:
    """A header the operation's answers with these statuses carry (the document listed none: a client
    generated from it knew of no Location on a 202, nor of Retry-After on a 429 or 503)."""
    return OpenApiParameter(name, str, OpenApiParameter.HEADER, response=statuses, description=description)


def retry_after(*statuses: int) -> OpenApiParameter:
    return response_header("Retry-After", list(statuses), "seconds to wait before trying again")


def _int_range(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def job_location(job: Job) -> str:
    return f"/v1/jobs/{job.id}"


def job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "params": job.params,
        "input": job.input,
        "output": {k: v for k, v in job.output.items() if k != "content_type"} if job.output else None,
        "error": job.error,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "result_expires_at": job.result_expires_at,
        "request_id": job.request_id,
    }


def _customer_job(request: Request, job_id: str) -> Job:
    try:
        job = job_load(staging_store(), job_id)
    except StagingError as e:
        raise ApiError(503, "staging_unavailable", "Jobs cannot be read right now; retry shortly.",
                       headers={"Retry-After": "1"}) from e
    # Another customer's job is indistinguishable from no job: its existence is not revealed.
    if job is None or job.customer_id != request.user.customer_id:
        raise ApiError(404, "job_not_found", f"There is no job {job_id}.")
    return job


def _accepted(job: Job, vary: bool = False) -> HttpResponse:
    response = JsonResponse(job_json(job), status=202)
    response["Location"] = job_location(job)
    response["Retry-After"] = "1"
    response["Cache-Control"] = "private, no-store"  # as a GET of the job: its state changes
    if vary:
        response["Vary"] = "Accept"
    return response


_EXPIRED = "The result was deleted after its retention period."
# POST /v1/resize replaying an Idempotency-Key whose job's result is gone: say what to do.
_REPLAY_EXPIRED = ("The result of the job this Idempotency-Key made was deleted after its retention period; "
                   "send the request again with a new Idempotency-Key to resize again.")


RESULT_STREAM_ABOVE_BYTES = 1024 * 1024  # results larger than this are read from the store in pieces
_RESULT_PIECE_BYTES = 256 * 1024


def _file_pieces(result: BinaryIO) -> Iterator[bytes]:
    try:
        while piece := result.read(_RESULT_PIECE_BYTES):
            yield piece
    finally:
        result.close()


def _job_outcome(job: Job, vary: bool = False, expired_detail: str = _EXPIRED,
                 head: bool = False) -> HttpResponse | StreamingHttpResponse:
    """The answer for a finished job: its image (its headers only, for a HEAD), or its error as a problem."""
    if job.status == FAILED:
        error = job.error or {}
        headers = {"Location": job_location(job)}
        if error.get("status") == 503:  # an idempotent replay of a job the queue refused: worth a retry
            headers["Retry-After"] = "2"
        return problem(error.get("status", 422), error.get("code", "job_failed"), error.get("detail", ""),
                       headers=headers, extra={"job_id": job.id})
    if job.result_expired():
        raise ApiError(410, "result_expired", expired_detail, headers={"Location": job_location(job)})
    try:
        result = job_result_open(staging_store(), job)
    except StagingNotFound as e:
        raise ApiError(410, "result_expired", expired_detail, headers={"Location": job_location(job)}) from e
    assert job.output is not None
    try:
        size = result.seek(0, os.SEEK_END)  # (not fstat: a store's object need not be a file)
        result.seek(0)
        # A HEAD's answer has the headers alone: the whole result was read (and gunicorn warned that it
        # dropped the body, once a HEAD).
        data = b"" if head else result.read() if size <= RESULT_STREAM_ABOVE_BYTES else None
    except OSError as e:
        result.close()
        raise StagingError(f"staging read failed: {e}") from e
    if data is not None:
        result.close()
        response: HttpResponse | StreamingHttpResponse = HttpResponse(data, content_type=job.output["content_type"])
        if head:
            response["Content-Length"] = str(size)
    else:
        # Read in pieces as the client takes them (the WSGI application paces them): held whole, a
        # large result cost a thread's memory per download, and slow readers of one 58 MB result took
        # a node's memory (found by the security review).
        response = StreamingHttpResponse(_file_pieces(result), content_type=job.output["content_type"])
        response["Content-Length"] = str(size)
    response["Location"] = job_location(job)
    response["Content-Disposition"] = f'inline; filename="{job.id}.{job.output["format"]}"'
    response["Cache-Control"] = "private, no-store"
    if vary:
        response["Vary"] = "Accept"
    return response


class CustomerView(APIView):
    """A customer's endpoint: its request holds one of the customer's threads in this process
    (admission.CustomerThreads) from authentication until its answer is written, whatever the answer."""

    _thread_of: str | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # authentication, scope, rate limit
        customer_id = getattr(request.user, "customer_id", None)
        if customer_id is not None:
            threads = admission.customer_threads()
            if not threads.take(customer_id):
                raise ApiError(429, "customer_over_share", f"This account already has {threads.limit} requests in "
                               "progress on this server (answers still being read count); wait for them before "
                               "sending more.", headers={"Retry-After": "1"})
            self._thread_of = customer_id

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        response = None
        try:
            response = super().dispatch(request, *args, **kwargs)
            return response
        finally:
            if self._thread_of is not None:
                customer_id, threads = self._thread_of, admission.customer_threads()
                if response is not None:  # given back once the server has written the answer (close())
                    # On this response object: a middleware that replaced it after the view (none does)
                    # would leave the slot held for the process's life.
                    response._resource_closers.append(lambda: threads.give(customer_id))
                else:
                    threads.give(customer_id)


class ResizeView(CustomerView):
    required_scope = "resize"

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        clock = metrics.StageClock()
        super().initial(request, *args, **kwargs)  # authentication, scope, rate limit
        clock.lap("auth")

    @extend_schema(
        operation_id="resize",
        summary="Resize an image",
        description=(
            "The body is the raw image (any Content-Type: the format is sniffed from the bytes) or "
            "multipart/form-data with the file in the field `image`. Answers 200 with the image, or "
            "202 with the job's Location when it takes longer than the synchronous wait (or when "
            "`Prefer: respond-async` is sent)."
        ),
        parameters=[
            OpenApiParameter("width", _int_range(1, imaging.MAX_SIDE), description="at least one of width/height"),
            OpenApiParameter("height", _int_range(1, imaging.MAX_SIDE)),
            OpenApiParameter("fit", str, enum=list(imaging.FITS), default="inside", description="as in sharp"),
            OpenApiParameter("format", str, enum=[*imaging.FORMATS, "auto"], description="default: the input's"),
            OpenApiParameter("quality", _int_range(1, 100), description="default per format"),
            OpenApiParameter("gravity", str, enum=list(imaging.GRAVITIES), default="center",
                             description="crop anchor for cover, placement for contain"),
            OpenApiParameter("background", str, pattern="^#?([0-9A-Fa-f]{6}|[0-9A-Fa-f]{8})$",
                             description="hex colour for contain padding and alpha flattening"),
            OpenApiParameter("enlarge", bool, default=False, description="allow upscaling for inside/outside"),
            OpenApiParameter("Prefer", str, OpenApiParameter.HEADER, description="respond-async for 202"),
            OpenApiParameter("Idempotency-Key", {"type": "string", "minLength": 1, "maxLength": 255},
                             OpenApiParameter.HEADER, description="a retry with the same key returns the same job"),
            response_header("Location", [200, 202], "the job: /v1/jobs/{id}"),
            response_header("Content-Disposition", [200], 'inline; filename="{id}.{format}"'),
            response_header("Vary", [200, 202], "Accept, with format=auto"),
            retry_after(202, 429, 503),
        ],
        request={"application/octet-stream": OpenApiTypes.BINARY,
                 "multipart/form-data": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}},
        responses={
            (200, "image/*"): OpenApiResponse(OpenApiTypes.BINARY, description="the resized image"),
            202: OpenApiResponse(JOB_SCHEMA, description="the job, at its Location: it takes longer than the "
                                 "synchronous wait, or `Prefer: respond-async` asked for it"),
            **problems(400, 401, 403, 408, 410, 413, 415, 422, 429, 500, 501, 503),
        },
    )
    def post(self, request: Request) -> HttpResponse:
        clock = metrics.StageClock()
        params = parse_params(single_values(request.query_params), request.headers.get("Accept", ""))
        idempotency_key = _idempotency_key(request)
        _refuse_content_coding(request)
        # Admission before the body is read: a refused request costs no buffering (ADR 0006).
        slots, customer_id = admission.admission(), request.user.customer_id
        try:
            slots.enter(customer_id)
        except admission.Refused as e:
            raise ApiError(e.status, e.code, e.detail, headers={"Retry-After": str(e.retry_after)}) from e
        finally:
            clock.lap("line")  # parsing and admission, with any wait in its line (ADR 0007)
        self._published = False
        try:
            return self._resize(request, params, idempotency_key, clock, slots)
        finally:
            slots.leave(customer_id, published=self._published)

    def handle_exception(self, exc: Exception) -> HttpResponse:
        # Refused before its body was read (401, 429, 503...): read and discard a small body, so the
        # client gets to read the answer and may reuse its connection.
        discard_unread_body(self.request._request, settings.REFUSED_BODY_DISCARD_BYTES)
        return super().handle_exception(exc)

    def _resize(self, request: Request, params: imaging.Params, idempotency_key: str | None,
                clock: metrics.StageClock, slots: admission.Admission) -> HttpResponse:
        django_request: HttpRequest = request._request
        data = read_upload(django_request, settings.MAX_UPLOAD_BYTES)
        django_request.resize_input_bytes = len(data)  # type: ignore[attr-defined]
        vary = params.format == "auto"  # the answer depends on Accept
        limits = engine_limits()
        try:
            facts = imaging.probe(data, limits)
            params = _with_format(params, imaging.output_format(params, facts))
            imaging.output_check(params, facts, limits)
        except imaging.ImageError as e:
            raise ApiError(e.status, e.code, e.message) from e
        clock.lap("upload")
        respond_async = _prefers_async(request.headers.get("Prefer", ""))
        waiter = None
        if not respond_async:
            waiter = job_waiter()
            if not waiter.usable():
                waiter = None  # no reply queue (broker trouble): fall back to re-reading the job
        replay = None
        try:
            monthly_quota_charge(request.user)
        except ApiError:
            # Out of quota, yet a retry of a request that made its job (and paid for it) before the
            # quota ran out is answered with that job, like any replay: it costs nothing.
            if idempotency_key is not None:
                replay = _idempotent_replay(request, params, data, idempotency_key)
            if replay is None:
                raise
        clock.lap("admission")

        expected: list[str] = []
        reply_to = waiter.queue_name if waiter is not None else None

        def before_publish(job_id: str) -> None:
            clock.lap("staging")
            if waiter is not None and reply_to is not None:
                waiter.expect(job_id, reply_to)
                expected.append(job_id)

        if replay is not None:
            return self._respond(replay, False, None, vary, respond_async, clock, slots)
        created = False
        try:
            job, created = job_submit(
                customer_id=request.user.customer_id,
                key_id=request.user.key_id,
                request_id=django_request.request_id,  # type: ignore[attr-defined]
                params=params,
                input_facts=facts,
                data=data,
                idempotency_key=idempotency_key,
                reply_to=reply_to,
                before_publish=before_publish,
            )
        except IdempotencyConflict as e:
            raise _key_reused() from e
        except QueueUnavailable as e:
            clock.lap("enqueue")  # a failed publish's time too: the stage's p99 must show a broker in trouble
            raise ApiError(503, "queue_unavailable", "The job queue is unavailable; retry shortly.",
                           headers={"Retry-After": "2"}) from e
        except StagingError as e:
            clock.lap("staging")
            raise ApiError(503, "staging_unavailable", "The upload could not be staged; retry shortly.",
                           headers={"Retry-After": "2"}) from e
        finally:
            if not created:
                monthly_quota_refund(request.user)
                for job_id in expected:  # expected, but the job never reached the queue
                    waiter.forget(job_id)  # type: ignore[union-attr]
        if created:
            clock.lap("enqueue")
            slots.published()  # the job is in the queue: the depth's next reading holds it
            self._published = True
        return self._respond(job, created, waiter, vary, respond_async, clock, slots)

    def _respond(self, job: Job, created: bool, waiter: JobWaiter | None, vary: bool, respond_async: bool,
                 clock: metrics.StageClock, slots: admission.Admission) -> HttpResponse:
        if respond_async:
            if not created and job.status == SUCCEEDED and not _result_kept(job):
                # A replay's 202 pointed at a result that answers 410: say so now, as without Prefer.
                raise ApiError(410, "result_expired", _REPLAY_EXPIRED, headers={"Location": job_location(job)})
            return _accepted(job, vary)
        started, published = time.monotonic(), time.time()
        try:
            _wait_finished(job.id, waiter if created else None, settings.SYNC_WAIT_SECONDS)
            current = job_load(staging_store(), job.id) or job
            if current.finished:
                response = _job_outcome(current, vary, _EXPIRED if created else _REPLAY_EXPIRED)
                if created and (queue_wait := metrics.job_stages_observe(current, published)) is not None:
                    slots.observe_queue_wait(queue_wait)
            else:
                response = _accepted(current, vary)
                if created and current.started_at is None:
                    # Not even started after the whole wait: at least that long a queue wait, which
                    # the adaptive limit must hear of (a job that never finishes reports nothing).
                    slots.observe_queue_wait(time.monotonic() - started)
        except StagingError:
            # The job is accepted (and charged): the store failing while we wait for it or read its
            # result must not tell the client to retry (a second job, billed again). Point it at the job.
            response = _accepted(job, vary)
        clock.cpu_lap("respond")
        return response


def _result_kept(job: Job) -> bool:
    """Whether a succeeded job's result is still there to fetch: not past its retention, and in the
    store (a result the store lost answers 410 as an expired one does). A store that cannot be asked
    says nothing: the job's Location is answered then."""
    if job.result_expired():
        return False
    try:
        job_result_open(staging_store(), job).close()
    except StagingNotFound:
        return False
    except (StagingError, OSError):
        pass
    return True


def _prefers_async(prefer: str) -> bool:
    """Whether a Prefer header (RFC 7240: preferences separated by commas, each a token with optional
    `=value` and `;` parameters, names case-insensitive) holds respond-async. Matched as a substring,
    `Prefer: no-respond-async` asked for a 202."""
    return any(item.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async" for item in prefer.split(","))


def _idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key (None without the header), checked before the body is read. An
    empty one is refused: it was read as no key, so a client whose key came out empty had every retry
    made (and billed) again, and an overlong one was refused only after the whole upload."""
    if "Idempotency-Key" not in request.headers:
        return None
    key = request.headers["Idempotency-Key"]
    if not key or len(key) > 255:
        raise ApiError(400, "invalid_idempotency_key", "Idempotency-Key must be 1 to 255 characters long.")
    return key


def _refuse_content_coding(request: Request) -> None:
    """415 for a body sent with a Content-Encoding (RFC 9110 15.5.16, with Accept-Encoding saying what is
    taken): the body was read as the image all the same, so a gzipped upload was told it was "not a JPEG,
    PNG, ..." and a plain one under a wrong label was resized as if there were none."""
    coding = request.headers.get("Content-Encoding", "").strip()
    if coding and coding.lower() != "identity":
        raise ApiError(415, "unsupported_media_type", f"The body has Content-Encoding {coding!r}, which is not "
                       "taken: send the image's bytes as they are, without a Content-Encoding.",
                       headers={"Accept-Encoding": "identity"})


def _idempotent_replay(request: Request, params: imaging.Params, data: bytes, idempotency_key: str) -> Job | None:
    try:
        return job_replay(customer_id=request.user.customer_id, params=params, data=data,
                          idempotency_key=idempotency_key)
    except IdempotencyConflict as e:
        raise _key_reused() from e
    except StagingError as e:
        raise ApiError(503, "staging_unavailable", "Jobs cannot be read right now; retry shortly.",
                       headers={"Retry-After": "2"}) from e


def _key_reused() -> ApiError:
    return ApiError(422, "idempotency_key_reused", "This Idempotency-Key was already used for a different request.")


def _with_format(params: imaging.Params, output_format: str) -> imaging.Params:
    return replace(params, format=output_format, accept=())


def _wait_finished(job_id: str, waiter: JobWaiter | None, timeout: float) -> None:
    """Wait for the job's completion notice. A notice can be lost on the way (the worker's broker
    node died before it was sent, or this process's reply queue went with its node), so the job is
    also re-read each second, and polled once the waiter says it lost its broker."""
    deadline = time.monotonic() + timeout
    if waiter is not None:
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                if waiter.wait(job_id, min(remaining, 1.0)):
                    break
                job = job_load(staging_store(), job_id)
                if job is None or job.finished:
                    return
        finally:
            waiter.forget(job_id)
    remaining = deadline - time.monotonic()
    if remaining > 0:
        _wait_polling(job_id, remaining)


def _wait_polling(job_id: str, timeout: float) -> None:
    """Wait for a job whose completion notice goes elsewhere (an idempotent replay of another
    request's job) or nowhere (no reply queue): re-read it with a growing interval."""
    deadline = time.monotonic() + timeout
    delays = iter(_POLL_SECONDS)
    while (remaining := deadline - time.monotonic()) > 0:
        job = job_load(staging_store(), job_id)
        if job is None or job.finished:
            return
        time.sleep(min(next(delays, _POLL_SECONDS[-1]), remaining))


class JobView(CustomerView):
    # A `resize` key reads jobs too: a 202 hands it a Location (a resize-only key got 403 there).
    required_scope = ("jobs", "resize")

    @extend_schema(operation_id="job", summary="A job's status, parameters and facts",
                   parameters=[retry_after(429, 503)],
                   responses={200: JOB_SCHEMA, **problems(400, 401, 403, 404, 429, 503)})
    def get(self, request: Request, job_id: str) -> HttpResponse:
        # It takes none: one given is refused, as on /v1/resize and /v1/usage (`?wait=30` was ignored).
        refuse_unknown(request.query_params, (), "this endpoint takes none")
        job = _customer_job(request, job_id)
        response = JsonResponse(job_json(job))
        response["Cache-Control"] = "private, no-store"
        return response


class JobResultView(CustomerView):
    required_scope = ("jobs", "resize")

    @extend_schema(operation_id="job_result", summary="A finished job's image",
                   parameters=[response_header("Content-Disposition", [200], 'inline; filename="{id}.{format}"'),
                               retry_after(409, 429, 503)],
                   responses={(200, "image/*"): OpenApiResponse(OpenApiTypes.BINARY, description="the image"),
                              **problems(400, 401, 403, 404, 409, 410, 429, 503)})
    def get(self, request: Request, job_id: str) -> HttpResponse:
        refuse_unknown(request.query_params, (), "this endpoint takes none")
        job = _customer_job(request, job_id)
        if job.status == FAILED:
            error = job.error or {}
            raise ApiError(409, "job_failed", f"The job failed: {error.get('detail', 'no detail')}",
                           extra={"job_error": error})
        if job.status != SUCCEEDED:
            raise ApiError(409, "job_not_finished", f"The job is {job.status}; its result is not ready yet.",
                           headers={"Retry-After": "1"})
        return _job_outcome(job, head=request.method == "HEAD")


def healthz(request: HttpRequest) -> HttpResponse:
    """The process is alive (it answers); says nothing about dependencies."""
    return JsonResponse({"status": "ok"})


class _DatabaseProbe:
    """A query (`SELECT pg_backend_pid()`) on a connection of its own, kept between checks, in a thread
    of its own, waited for at most WAIT seconds: a database that does not answer (a partition: the
    connect alone takes its 2 s timeout) made /readyz slower than the load balancer's check interval,
    and every node was taken out for an outage that should leave them serving. One probe at a time; a
    readyz arriving while one is still out reports it as slow. A failed query is tried once more on a
    new connection (the kept one may have been closed by the server meanwhile); with no check for
    IDLE_SECONDS the connection is closed. Until 2026-11-22 each check connected anew: a PostgreSQL
    backend started and ended for every check of every node."""

    WAIT = 0.5
    IDLE_SECONDS = 30  # the kept connection is closed when no check has come for this long

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._asked = self._answered = 0  # checks asked for, and the last one the probe has answered
        self._result = "degraded: not probed yet"
        self.backend_pid: int | None = None
        self._closing = False

    def state(self) -> str:
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="readyz-database", daemon=True)
                self._thread.start()
            self._asked += 1
            asked = self._asked
            self._changed.notify_all()
            if not self._changed.wait_for(lambda: self._answered >= asked, self.WAIT):
                return f"degraded: no answer in {self.WAIT:g} s"
            return self._result

    def close(self) -> None:
        """Close the kept connection now (the probe's thread does; the next check opens another): a test
        run's end, whose database cannot be dropped while a session is open on it."""
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                return
            self._closing = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._closing, 5)

    def _run(self) -> None:
        while True:
            with self._changed:
                asked_again = self._changed.wait_for(lambda: self._asked > self._answered or self._closing,
                                                     self.IDLE_SECONDS)
                asked, closing = self._asked, self._closing
            if closing or not asked_again:
                self._close()  # asked to, or nobody is checking (no load balancer): hold no connection
                with self._changed:
                    self._closing = False
                    self._changed.notify_all()
                continue
            result = self._probe()
            with self._changed:
                self._result, self._answered = result, asked
                self._changed.notify_all()

    def _probe(self) -> str:
        try:
            return self._query()
        except Exception:
            self._close()  # perhaps closed by the server while kept: try once on a new connection
        try:
            return self._query()
        except Exception as e:
            self._close()
            return f"degraded: {type(e).__name__}"

    def _query(self) -> str:
        connection.ensure_connection()  # this thread's own connection
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            self.backend_pid = cursor.fetchone()[0]  # which server process answered (tests)
        return "ok"

    @staticmethod
    def _close() -> None:
        try:
            connection.close()
        except Exception:
            pass  # a broken connection is dropped all the same


_database_probe = _DatabaseProbe()


def _broker_state() -> str:
    """What the process's queue probe last heard from the broker (controlplane/admission.py: a passive
    declare of the resize queue every ADMISSION_QUEUE_PROBE_SECONDS, on a connection it keeps); when
    that is stale, the probe tries again at once and the check waits up to 1 s for it. Until 2026-11-22
    each check opened a connection of its own: a TCP and AMQP handshake every check of every node."""
    probe = admission.queue_probe()
    probe.first.wait(3)  # a process's first check: let its probe try once
    if probe.fresh(timeout=1.0) is None:  # a probe in its backoff tries again now
        return f"unavailable: no answer in {probe.stale_after:g} s"
    refused = broker_alarm.refused_ago()
    if refused is not None:
        # Still ready: any node's publishes are refused alike, and this one still answers them at once
        # (503 queue_unavailable), serves results and job states.
        return f"degraded: publishing blocked by a resource alarm ({refused:.0f} s ago)"
    return "ok"


def readyz(request: HttpRequest) -> HttpResponse:
    """Ready to serve resizes: the broker and the staging store answer, and the identity snapshot
    is fresh enough to trust. A database outage alone is `degraded` (200): this node still
    authenticates from its snapshot and resizes, so a load balancer must keep sending it traffic."""
    checks: dict[str, str] = {"database": _database_probe.state(), "broker": _broker_state()}
    try:
        staging_store().check()
        checks["staging"] = "ok"
    except Exception as e:
        checks["staging"] = f"unavailable: {type(e).__name__}"
    age = credential_cache().age()
    if age is None:
        checks["identity"] = "unavailable: no snapshot yet"
    elif age > settings.AUTH_MAX_STALENESS_SECONDS:
        checks["identity"] = f"unavailable: snapshot {age:.0f} s old"
    elif age > 3 * settings.AUTH_POLL_SECONDS + 2:
        # Degraded, still serving: authentication runs on the last good snapshot.
        checks["identity"] = f"degraded: snapshot {age:.0f} s old"
    else:
        checks["identity"] = "ok"
    if draining.active():
        # Stopping (SIGTERM, API_DRAIN_SECONDS): out of the load balancer's rotation, still serving.
        checks["node"] = "unavailable: draining (stopping)"
    failing = sorted(name for name, state in checks.items() if state.startswith("unavailable"))
    if failing:
        return problem(503, "not_ready", f"Not ready: {', '.join(failing)} unavailable.",
                       headers={"Retry-After": "5"}, extra={"checks": checks})
    status = "degraded" if any(state != "ok" for state in checks.values()) else "ready"
    return JsonResponse({"status": status, "checks": checks})
