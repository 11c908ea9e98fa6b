"""Jobs: one resize request's document, input and result in the staging store, and its life cycle.

queued -> running -> succeeded | failed. The API creates a job, a worker runs it, the API (or a
later GET) reads it. Nothing here touches Postgres: resizing keeps working while the management
database is away. Every write replaces the whole document atomically.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO

from resizer.staging import PROBE_PREFIX, PROBE_RETENTION_SECONDS, StagingError, StagingNotFound, StagingStore

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
FINISHED = (SUCCEEDED, FAILED)
UNFINISHED_RETENTION_FACTOR = 7  # see staging_sweep
SWEEP_PREFIX = "sweep"  # the sweep's own: none of the prefixes it sweeps
SWEEP_MARK_KEY = f"{SWEEP_PREFIX}/finished"  # written by each sweep that finished

log = logging.getLogger(__name__)
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime | None) -> str | None:
    return t.isoformat().replace("+00:00", "Z") if t else None


def parse_time(value: str | None) -> datetime | None:
    """A job document's timestamp (ISO 8601, UTC, `Z`) as a datetime; None when absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass
class Job:
    id: str
    customer_id: str
    key_id: str
    request_id: str
    params: dict[str, Any]
    input: dict[str, Any]
    status: str = QUEUED
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: str = field(default_factory=lambda: _iso(_now()) or "")
    started_at: str | None = None
    finished_at: str | None = None
    result_expires_at: str | None = None
    attempts: int = 0
    cpu_seconds: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def queue_wait(self) -> float | None:
        """Seconds from created (the API host's clock) to started (the worker host's); None before it started."""
        created, started = parse_time(self.created_at), parse_time(self.started_at)
        return max(0.0, (started - created).total_seconds()) if created and started else None

    def result_expired(self, now: datetime | None = None) -> bool:
        expires = parse_time(self.result_expires_at)
        return expires is not None and (now or _now()) >= expires


_JOB_FIELDS = frozenset(f.name for f in fields(Job))


def _prefix(job_id: str) -> str:
    return f"jobs/{job_id[:2]}/{job_id}"


def _doc_key(job_id: str) -> str:
    return f"{_prefix(job_id)}/job.json"


def input_key(job_id: str) -> str:
    return f"{_prefix(job_id)}/input"


def output_key(job_id: str) -> str:
    return f"{_prefix(job_id)}/output"


def _idempotency_key(customer_id: str, key: str) -> str:
    return f"idempotency/{customer_id}/{hashlib.sha256(key.encode()).hexdigest()}"


def _document(job: Job) -> bytes:
    # vars(), not dataclasses.asdict(): the document is JSON already (strings, numbers, flat dicts), and
    # asdict's recursive deep copy cost 50 us of CPU a call (four a job: three saves and the decision).
    return json.dumps(vars(job), separators=(",", ":")).encode()


def job_save(store: StagingStore, job: Job) -> None:
    store.put(_doc_key(job.id), _document(job))


def is_job_id(value: object) -> bool:
    """Job ids are uuid4().hex: exactly 32 lower-case hex digits. uuid.UUID() also takes dashes anywhere,
    braces, "urn:uuid:" and non-ASCII digits, which as a path could be too long (a 503) or another spelling."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def job_load(store: StagingStore, job_id: str) -> Job | None:
    if not is_job_id(job_id):
        return None
    return _read_job(store, _doc_key(job_id))


def _read_job(store: StagingStore, key: str) -> Job | None:
    """A job document of the store, or None when there is none, or none readable (_read_json)."""
    document = _read_json(store, key)
    if document is None:
        return None
    try:
        return _job_from(document)
    except TypeError as e:  # a JSON object without a job's fields
        log.error("staging document %s is not a job (%s); treated as missing", key, e)
        return None


def _read_json(store: StagingStore, key: str) -> dict[str, Any] | None:
    """A JSON document of the store, or None when there is none, or none readable: a host that crashed
    just after a write may leave it empty (DirectoryStore renames without an fsync). Until 2026-11-22 an
    unreadable job document was a 500 on every GET of the job and stopped every staging sweep at it."""
    try:
        document = json.loads(store.get(key))
    except StagingNotFound:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        log.error("staging document %s is unreadable (%s); treated as missing", key, e)
        return None
    if not isinstance(document, dict):
        log.error("staging document %s is not a JSON object; treated as missing", key)
        return None
    return document


def _job_from(document: dict[str, Any]) -> Job:
    # Fields a newer version added are ignored, so a rolling deploy's older processes keep reading.
    return Job(**{k: v for k, v in document.items() if k in _JOB_FIELDS})


def job_create(
    store: StagingStore,
    *,
    customer_id: str,
    key_id: str,
    request_id: str,
    params: dict[str, Any],
    input_facts: dict[str, Any],
    data: bytes,
    idempotency_key: str | None = None,
    _tries: int = 0,
) -> tuple[Job, bool]:
    """Stage the input and a queued job. Returns (job, created); created is False when an earlier
    request with the same Idempotency-Key already made the job, which is then returned instead.
    Raises IdempotencyConflict when that earlier request asked for something else."""
    if _tries >= 5:  # the key's record kept changing under us: a store in trouble
        raise StagingError(f"the idempotency record of {idempotency_key!r} kept changing")
    job = Job(
        id=uuid.uuid4().hex,
        customer_id=customer_id,
        key_id=key_id,
        request_id=request_id,
        params=params,
        input=input_facts,
    )
    store.put(input_key(job.id), data)
    job_save(store, job)
    if idempotency_key is None:
        return job, True
    fingerprint = _fingerprint(params, data)
    record = json.dumps({"job_id": job.id, "fingerprint": fingerprint}).encode()
    slot = _idempotency_key(customer_id, idempotency_key)
    if store.put_new(slot, record):
        return job, True
    store.delete(_prefix(job.id))  # lost the race (or a retry): the earlier job stands
    earlier_id = _slot_job_id(store, slot, fingerprint, idempotency_key)
    existing = job_load(store, earlier_id) if earlier_id not in (None, _UNREADABLE) else None
    if existing is None:
        # The key was freed meanwhile (its job never reached the queue), or its job was swept, or its
        # record is unreadable (a host crash after the write): in the last two the key is freed here.
        # Then try again (an unreadable record was retried without end until 2026-11-22, staging the
        # upload anew each time, ~2,000 times before a RecursionError).
        if earlier_id is not None:
            store.delete(slot)
        return job_create(store, customer_id=customer_id, key_id=key_id, request_id=request_id,
                          params=params, input_facts=input_facts, data=data, idempotency_key=idempotency_key,
                          _tries=_tries + 1)
    return existing, False


_UNREADABLE = "\0unreadable"  # _slot_job_id's answer for a record that exists but cannot be read


def _slot_job_id(store: StagingStore, slot: str, fingerprint: str, idempotency_key: str) -> str | None:
    """The job id an Idempotency-Key's record names (None: no record; _UNREADABLE: one that cannot be
    read). Raises IdempotencyConflict when the record was made for another request."""
    try:
        raw = store.get(slot)
    except StagingNotFound:
        return None
    try:
        earlier = json.loads(raw)
    except ValueError:
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("job_id"), str) \
            or not isinstance(earlier.get("fingerprint"), str):
        log.error("idempotency record %s is unreadable; the key is freed", slot)
        return _UNREADABLE
    if earlier["fingerprint"] != fingerprint:
        raise IdempotencyConflict(idempotency_key)
    return earlier["job_id"]


def _fingerprint(params: dict[str, Any], data: bytes) -> str:
    # Only a keyed request pays for hashing its body (0.16 ms of CPU for 256 KB, 0.5 ms for 900 KB).
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(data)
    return digest.hexdigest()


def job_by_idempotency_key(store: StagingStore, *, customer_id: str, idempotency_key: str,
                           params: dict[str, Any], data: bytes) -> Job | None:
    """The job an earlier request with this Idempotency-Key made, if any (None: the key is free, or its
    job is gone). Raises IdempotencyConflict when that request asked for something else."""
    earlier_id = _slot_job_id(store, _idempotency_key(customer_id, idempotency_key), _fingerprint(params, data),
                              idempotency_key)
    return job_load(store, earlier_id) if earlier_id not in (None, _UNREADABLE) else None


def job_release_idempotency(store: StagingStore, *, customer_id: str, idempotency_key: str) -> None:
    """Free a key whose job never reached the queue, so the client's retry makes a fresh job."""
    store.delete(_idempotency_key(customer_id, idempotency_key))


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different request."""


def job_start(store: StagingStore, job: Job) -> Job:
    job.status = RUNNING
    job.attempts += 1
    job.started_at = _iso(_now())
    job_save(store, job)
    return job


def job_mark_succeeded(store: StagingStore, job: Job, *, data: bytes, output: dict[str, Any], cpu_seconds: float,
                       result_ttl_seconds: int) -> Job:
    """Store the result and mark the job succeeded, in memory only: `job_finish` makes it visible."""
    store.put(output_key(job.id), data)
    now = _now()
    job.status = SUCCEEDED
    job.output = output
    job.cpu_seconds = round(cpu_seconds, 6)
    job.finished_at = _iso(now)
    job.result_expires_at = _iso(now + timedelta(seconds=result_ttl_seconds))
    return job


def job_mark_failed(job: Job, *, status: int, code: str, detail: str) -> Job:
    """Mark the job failed, in memory only: `job_finish` makes it visible."""
    job.status = FAILED
    job.error = {"status": status, "code": code, "detail": detail}
    job.finished_at = _iso(_now())
    return job


def _decision_key(job_id: str) -> str:
    return f"{_prefix(job_id)}/decision.json"


def job_decide(store: StagingStore, job: Job) -> tuple[Job, bool]:
    """Claim the job's one outcome with this one (a job marked finished in memory), atomically: the
    first to decide wins (a delivery of the job, or the API failing a publish that looked lost), and
    every other is given the winner's. Returns (the job as decided, whether this call decided it).
    Readers still see the job running until job_finish; a redelivery after a decision (the worker died,
    or the store failed, once the usage record was written) finishes the job as decided instead of
    running it again, so the record it writes again is the same record."""
    if store.put_new(_decision_key(job.id), _document(job)):
        return job, True
    decided = job_decision(store, job.id)
    if decided is None:  # the decision went with its job (swept): nothing to adopt
        return job, True
    return decided, False


def job_decision(store: StagingStore, job_id: str) -> Job | None:
    """The outcome decided for the job (job_decide), if any."""
    return _read_job(store, _decision_key(job_id))


def job_finish(store: StagingStore, job: Job, *, result_ttl_seconds: int | None = None) -> Job:
    """Save a finished job's document (from here on anyone reading it sees it finished) and drop its input.
    A success's result expires `result_ttl_seconds` from now, when it becomes visible, not from when it
    was decided: a job finished late (its usage record could not be written for a while, its message
    replayed from the dead letters) was otherwise visible already expired, a 410 for an image billed."""
    if result_ttl_seconds is not None and job.status == SUCCEEDED:
        expires = _now() + timedelta(seconds=result_ttl_seconds)
        decided = parse_time(job.result_expires_at)
        job.result_expires_at = _iso(max(decided, expires) if decided else expires)
    job_save(store, job)
    store.delete(input_key(job.id))
    return job


def job_succeed(store: StagingStore, job: Job, *, data: bytes, output: dict[str, Any], cpu_seconds: float,
                result_ttl_seconds: int) -> Job:
    return job_finish(store, job_mark_succeeded(store, job, data=data, output=output, cpu_seconds=cpu_seconds,
                                                result_ttl_seconds=result_ttl_seconds),
                      result_ttl_seconds=result_ttl_seconds)


def job_fail(store: StagingStore, job: Job, *, status: int, code: str, detail: str) -> Job:
    return job_finish(store, job_mark_failed(job, status=status, code=code, detail=detail))


def job_input(store: StagingStore, job: Job) -> bytes:
    return store.get(input_key(job.id))


def job_result_open(store: StagingStore, job: Job) -> BinaryIO:
    """The job's result as a file to read in pieces (the caller closes it)."""
    return store.open(output_key(job.id))


def staging_sweep(store: StagingStore, *, job_retention_seconds: int) -> dict[str, int]:
    """Delete expired results, and whole jobs (and idempotency records) past their retention, and
    health-check probe files left by a process killed mid-check. An entry that cannot be deleted is
    logged, counted under `failed` and tried again on the next sweep; it does not stop the sweep of
    everything else."""
    removed = {"results": 0, "jobs": 0, "idempotency": 0, "probes": 0, "failed": 0}
    now = _now()

    def delete(key: str, kind: str) -> None:
        try:
            removed[kind] += store.delete(key)
        except StagingError as e:
            log.warning("staging sweep could not delete %s: %s", key, e)
            removed["failed"] += 1

    for prefix, age in store.scan("jobs", depth=2):
        job = job_load(store, prefix.rsplit("/", 1)[-1])
        # A job still waiting for a worker (workers away for a day, a dead-letter replay) keeps its
        # input and document up to UNFINISHED_RETENTION_FACTOR times longer: its message may still come.
        unfinished = job is not None and not job.finished
        if age > job_retention_seconds * (UNFINISHED_RETENTION_FACTOR if unfinished else 1):
            delete(prefix, "jobs")
            continue
        # A result of a job that ended failed (a delivery wrote it, another outcome was decided first)
        # goes at once: image bytes are kept only to be fetched.
        if job is not None and job.finished and (job.status != SUCCEEDED or job.result_expired(now)):
            delete(output_key(job.id), "results")
    for key, age in store.scan("idempotency", depth=2):
        if age > job_retention_seconds:
            delete(key, "idempotency")
    for key, age in store.scan(PROBE_PREFIX, depth=1):
        if age > PROBE_RETENTION_SECONDS:  # a check holds its probe file for milliseconds
            delete(key, "probes")
    for key, age in store.scan(SWEEP_PREFIX, depth=1):
        if key != SWEEP_MARK_KEY and age > PROBE_RETENTION_SECONDS:  # a mark's temporary file, its writer killed
            delete(key, "probes")
    # The trace of a finished sweep: its age is on /metrics (StagingSweepStale). Without it a sweep that
    # stopped (beat down, the task failing every run) showed only as a disk filling up with results.
    store.put(SWEEP_MARK_KEY, json.dumps({**removed, "finished_at": _now().isoformat()}).encode())
    return removed


def staging_sweep_age(store: StagingStore) -> float | None:
    """Seconds since the last staging sweep finished (its mark's age); None if none ever did."""
    return next((age for key, age in store.scan(SWEEP_PREFIX, depth=1) if key == SWEEP_MARK_KEY), None)
