"""The local, durable spool of usage records and the shipper that moves it to Postgres in batches.

A record is appended to a segment file and fsynced before the job it describes is announced. A
shipper (a thread in each emitting process, or `manage.py metering_run ship`) COPYs whole segments
into the staging table and deletes a segment only after the commit. docs/adr/0004 has the protocol.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.types.json import Jsonb

from resizer.staging import StagingError

log = logging.getLogger(__name__)
# Background threads draw their jitter from their own generator, never the global one.
_jitter = random.Random()

# The staging table's columns in COPY order (received_at is the database's clock, set on insert).
COLUMNS = (
    "id", "customer_id", "key_id", "request_id", "event_time", "outcome", "error_code", "attempts",
    "input_format", "input_width", "input_height", "input_bytes", "input_megapixels",
    "output_format", "output_width", "output_height", "output_bytes", "output_megapixels",
    "cpu_seconds", "wall_seconds", "params",
)
_UUIDS = ("id", "customer_id", "key_id")
# Integer columns and their largest value (int2, int4, int8), text columns and their lengths, as in models.py.
_INTS = {"attempts": 2**15 - 1, "input_width": 2**31 - 1, "input_height": 2**31 - 1, "input_bytes": 2**63 - 1,
         "output_width": 2**31 - 1, "output_height": 2**31 - 1, "output_bytes": 2**63 - 1}
_DECIMALS = ("input_megapixels", "output_megapixels", "cpu_seconds", "wall_seconds")  # numeric(14, 6)
_TEXTS = {"request_id": 200, "error_code": 64, "input_format": 16, "output_format": 16, "outcome": 16}
_REQUIRED = ("id", "customer_id", "event_time", "outcome")
_SUFFIX = ".jsonl"


# A parsed row, the segment it came from and its line (to set it aside if the table refuses it).
_Pending = tuple[tuple[Any, ...], Path, bytes]


class SpoolError(StagingError):
    """The spool cannot be written. A StagingError, so the resize task requeues the job rather than
    announcing a job whose usage record is not durable."""


class ShipError(Exception):
    """The staging table is unreachable, or refuses records for a reason that is not theirs (a column a
    deploy added, a constraint): every segment stays in the spool for the next attempt."""


# Refusals that are the table's, not one record's: the shipper fills every column it copies, so a NOT
# NULL it breaks is on a column it does not know (a deploy added one without a default). (A missing
# column or table, a privilege, is a ProgrammingError: never taken for a record's fault either.)
_TABLE_WIDE = (psycopg.errors.NotNullViolation,)


def _plain_row() -> tuple[Any, ...]:
    """An ordinary succeeded record, inserted and rolled back to tell a table that refuses every record
    from records that are bad themselves."""
    return record_row({
        "id": uuid.uuid4().hex, "customer_id": str(uuid.uuid4()), "key_id": str(uuid.uuid4()),
        "request_id": uuid.uuid4().hex, "event_time": datetime.now(timezone.utc).isoformat(), "outcome": "succeeded",
        "attempts": 1, "input_format": "jpeg", "input_width": 1000, "input_height": 500, "input_bytes": 250_000,
        "input_megapixels": "0.5", "output_format": "jpeg", "output_width": 200, "output_height": 100,
        "output_bytes": 9_000, "output_megapixels": "0.02", "cpu_seconds": "0.007", "wall_seconds": "0.009",
        "params": {"width": 200},
    })


def _linked(handle: IO[bytes], path: Path) -> bool:
    """Is `path` still the file open as `handle` (not shipped and deleted since)?"""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(handle.fileno())
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """One process's writer. Segments are locked with flock(2) for each append; a shipper takes a
    segment by locking it, so the writer that finds its segment locked or gone starts a new one.
    flock is released when a process dies, which is how a dead process's segments are claimed."""

    def __init__(self, directory: Path, *, segment_records: int) -> None:
        self.directory = Path(directory)
        self.segment_records = segment_records
        self._tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self._handle: IO[bytes] | None = None
        self._path: Path | None = None
        self._count = 0
        self._lock = threading.Lock()
        self.rotated = threading.Event()  # a full segment is waiting: the shipper need not wait its tick

    def append(self, record: dict[str, Any]) -> None:
        """Append one record durably (written and fsynced) or raise SpoolError."""
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            try:
                self._append(line)
            except OSError as e:
                self._close()
                raise SpoolError(f"usage spool {self.directory} is not writable: {e}") from e

    def _append(self, line: bytes) -> None:
        for _ in range(3):
            if self._handle is None:
                handle = self._open_locked()
            else:
                handle = self._handle
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._close()  # a shipper holds it: leave it to the shipper
                    continue
                if self._path is None or not _linked(handle, self._path):
                    self._close()  # shipped and deleted since the last append
                    continue
            try:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                if not handle.closed:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            self._count += 1
            if self._count >= self.segment_records:
                self._close()
                self.rotated.set()
            return
        raise OSError("no spool segment could be locked")

    def _open_locked(self) -> IO[bytes]:
        """A new segment, locked before its name appears, so no shipper can take it empty."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        path = self.directory / f"{self._tag}-{self._seq:06d}{_SUFFIX}"
        tmp = self.directory / f".{path.name}.new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(tmp, path)
        fsync_dir(self.directory)  # the name must survive a crash as well as the bytes
        self._handle, self._path, self._count = os.fdopen(fd, "ab"), path, 0
        return self._handle

    def _close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
        self._handle, self._path = None, None


def record_row(record: dict[str, Any]) -> tuple[Any, ...]:
    """A record as a COPY row that the staging table accepts, or ValueError."""
    for name in _REQUIRED:
        if record.get(name) in (None, ""):
            raise ValueError(f"{name} is missing")
    row: list[Any] = []
    for name in COLUMNS:
        value = record.get(name)
        if value is None or value == "":
            value = "" if name in _TEXTS else 1 if name == "attempts" else None
        elif name in _UUIDS:
            value = uuid.UUID(str(value))
        elif name in _INTS:
            value = int(value)
            if not 0 <= value <= _INTS[name]:
                raise ValueError(f"{name}={value} is out of range")
        elif name in _DECIMALS:
            try:
                value = Decimal(str(value))
            except InvalidOperation:
                raise ValueError(f"{name}={value!r} is not a number") from None
            if not value.is_finite() or not 0 <= value < 10**8:
                raise ValueError(f"{name}={value} is out of range")
        elif name == "params":
            if not isinstance(value, dict) or len(json.dumps(value)) > 4096:
                raise ValueError("params is not a small JSON object")
            value = Jsonb(value)
        elif name == "event_time":
            value = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            if value.tzinfo is None:
                raise ValueError("event_time has no time zone")
        else:
            value = str(value)[:_TEXTS[name]]
        row.append(value)
    return tuple(row)


class Shipper:
    """Ships every segment in a spool directory that nobody holds, in batches of about
    `batch_records` records, each batch one transaction: COPY into a temporary table, then
    INSERT ... ON CONFLICT (id) DO NOTHING, so a batch shipped twice inserts nothing the second time."""

    def __init__(self, directory: Path, *, batch_records: int, statement_timeout: float = 60,
                 idle_timeout: float = 60) -> None:
        self.directory = Path(directory)
        self.batch_records = batch_records
        # Seconds; their sum bounds how long after a row's received_at its commit can land (settings.py
        # requires METERING_LOOKBACK_SECONDS to exceed it).
        self.statement_timeout = statement_timeout
        self.idle_timeout = idle_timeout
        self._connection: psycopg.Connection[Any] | None = None
        self._conninfo: str | None = None

    def ship(self, *, conninfo: str) -> int:
        """Returns the rows inserted (not those already there, nor records set aside). Raises ShipError,
        leaving the batch's segments in the spool, when the staging table cannot be reached or refuses
        records for a reason that is not theirs (the batches before it are shipped)."""
        shipped = 0
        group: list[tuple[Path, IO[bytes]]] = []
        rows: list[_Pending] = []
        rejects: list[tuple[Path, bytes, str]] = []
        self._sweep_unborn()
        try:
            for path in self._segments():
                handle = None
                try:
                    handle = self._claim(path)
                    if handle is None:
                        continue
                    segment_rows = self._rows(path, handle, rejects)
                except OSError as e:
                    if handle is not None:
                        handle.close()  # its lock goes with it
                    if e.errno in (errno.EISDIR, errno.EIO):  # never readable as a segment: set aside
                        self._quarantine(path, e)
                    else:  # permissions, descriptors, locks: perhaps passing; skipped this round only
                        log.error("usage spool %s: not read this round (%s)", path.name, e)
                    continue
                group.append((path, handle))
                rows.extend(segment_rows)
                if len(rows) >= self.batch_records:
                    shipped += self._commit(group, rows, rejects, conninfo)
                    group, rows, rejects = [], [], []
            if group:
                shipped += self._commit(group, rows, rejects, conninfo)
                group = []
        finally:
            for _, handle in group:
                handle.close()  # releases the lock: the segment waits for the next attempt
        return shipped

    def pending(self) -> int:
        """Segment files waiting in the spool (held or not)."""
        return sum(1 for _ in self._segments())

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:
                pass
        self._connection = None

    def _sweep_unborn(self) -> None:
        """Remove segments whose writer died between creating and naming them (they hold nothing;
        a live writer names its segment microseconds after creating it)."""
        for path in self.directory.glob(".*.new"):
            try:
                if time.time() - path.stat().st_mtime < 60:
                    continue
            except FileNotFoundError:
                continue
            handle = self._claim(path)
            if handle is not None:
                path.unlink(missing_ok=True)
                handle.close()

    def _segments(self) -> Iterator[Path]:
        try:
            entries = sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: p.name)
        except FileNotFoundError:
            return iter(())
        return iter(entries)

    def _claim(self, path: Path) -> IO[bytes] | None:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()  # a writer mid-append, or another shipper
            return None
        if not _linked(handle, path):
            handle.close()  # another shipper shipped it between our open and our lock
            return None
        return handle

    def _rows(self, path: Path, handle: IO[bytes], rejects: list[tuple[Path, bytes, str]]) -> list[_Pending]:
        rows = []
        data = handle.read()
        lines = data.split(b"\n")
        if lines and lines[-1]:
            # A torn last line: its writer died inside append(), before fsync returned, so the job
            # was never announced and its message will be redelivered and the record re-emitted.
            log.warning("usage spool %s: dropping a torn last line (%d bytes)", path.name, len(lines[-1]))
        for line in lines[:-1]:
            if not line:
                continue
            try:
                rows.append((record_row(json.loads(line)), path, line))
            except Exception as e:  # noqa: BLE001 - any line that cannot become a row is set aside:
                # ValueError and TypeError mostly, but 1e400 in an integer column is an OverflowError and
                # deep nesting a RecursionError; either would stop this segment (and all after it) for good.
                rejects.append((path, line, f"{type(e).__name__}: {e}"))
        return rows

    def _reject(self, path: Path, line: bytes, why: str) -> None:
        """Keep a record that can never be inserted aside for an operator, so it cannot block its batch."""
        log.error("usage spool %s: record rejected (%s): %s", path.name, why, line[:300])
        rejected = self.directory / "rejected"
        if not rejected.is_dir():
            rejected.mkdir(exist_ok=True)
            fsync_dir(self.directory)  # the new directory's entry, before its segment goes
        target = rejected / path.name
        for _ in range(3):
            new = not target.exists()
            with open(target, "ab") as f:
                # Locked, and still the file named `target`: `reship_rejected` moves a reject file back
                # into the spool under the same lock, and a line appended after that would go with it.
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                if not _linked(f, target):
                    continue
                f.write(line + b"\n")
                f.flush()
                os.fsync(f.fileno())
            if new:
                fsync_dir(rejected)
            return
        raise OSError(f"{target} kept moving")

    def _commit(self, group: list[tuple[Path, IO[bytes]]], rows: list[_Pending],
                rejects: list[tuple[Path, bytes, str]], conninfo: str) -> int:
        inserted = 0
        try:
            if rows:
                inserted = self._insert([row for row, _, _ in rows], conninfo)
        except (psycopg.DataError, psycopg.IntegrityError) as e:
            # Find the rows the table refuses, ship the rest; the refused are set aside with the others.
            # Unless the refusal is the table's (ShipError: every segment of the batch stays).
            inserted, refused = self._insert_each(rows, conninfo, e)
            rejects = rejects + refused
        except psycopg.Error as e:
            self.close()
            raise ShipError(f"usage records not shipped: {type(e).__name__}: {e}") from e
        # After the commit, one segment's trouble (its reject file or its unlink failing: permissions,
        # a full or read-only disk) must not stop the others: it stays, and is shipped again (a no-op
        # for its inserted rows) next time.
        stay: set[Path] = set()
        for path, line, why in rejects:
            if path in stay:
                continue
            try:
                self._reject(path, line, why)
            except OSError as e:
                log.error("usage spool %s: rejected record not set aside (%s); the segment stays", path.name, e)
                stay.add(path)
        for path, handle in group:
            if path not in stay:
                try:
                    path.unlink(missing_ok=True)  # only after the commit: a crash before this re-ships (a no-op)
                except OSError as e:
                    log.error("usage spool %s: shipped but not removed (%s); it will be shipped again", path.name, e)
            handle.close()
        group.clear()
        return inserted

    def _quarantine(self, path: Path, error: OSError) -> None:
        """Move a segment that cannot be read to `bad/` for an operator, so the segments after it ship."""
        log.error("usage spool %s: unreadable (%s); set aside in bad/", path.name, error)
        try:
            bad = self.directory / "bad"
            bad.mkdir(exist_ok=True)
            path.rename(bad / path.name)
        except OSError as e:
            log.error("usage spool %s: could not be set aside either (%s); skipped", path.name, e)

    def _insert_each(self, rows: list[_Pending], conninfo: str,
                     error: psycopg.Error) -> tuple[int, list[tuple[Path, bytes, str]]]:
        """After the batch was refused with `error`: insert the rows one by one; returns how many were
        inserted and those the table refuses. Raises ShipError (the batch's segments stay, and the
        shipper backs off) when the refusal is the table's, not the records': until 2026-11-22 a column
        a deploy added NOT NULL without a default, or a CHECK no record passes, sent every record to
        rejected/, deleted the segments and counted them as shipped."""
        self._table_accepts_records(error, conninfo)
        inserted, refused = 0, []
        for row, path, line in rows:
            try:
                inserted += self._insert([row], conninfo)
            except _TABLE_WIDE as e:
                raise self._table_refuses(e) from e
            except (psycopg.DataError, psycopg.IntegrityError) as e:
                refused.append((path, line, f"{type(e).__name__}: {e}"))
            except psycopg.Error as e:
                self.close()
                raise ShipError(f"usage records not shipped: {type(e).__name__}: {e}") from e
        # The table took an ordinary record (above): what it refuses now is the records' own fault, set
        # aside even when the whole batch is refused. Kept in the spool instead (as for a while on
        # 2026-11-22), a full segment of bad records came first on every try and stopped the host's
        # metering for good.
        return inserted, refused

    def _table_accepts_records(self, error: psycopg.Error, conninfo: str) -> None:
        """Raise ShipError if the batch's refusal is the table's: an error of a kind no record causes,
        or an ordinary record (inserted, then rolled back) refused too."""
        if isinstance(error, _TABLE_WIDE):
            raise self._table_refuses(error) from error
        try:
            self._insert([_plain_row()], conninfo, rollback=True)
        except (psycopg.DataError, psycopg.IntegrityError) as e:
            raise self._table_refuses(e) from e
        except psycopg.Error as e:
            self.close()
            raise ShipError(f"usage records not shipped: {type(e).__name__}: {e}") from e

    def _table_refuses(self, error: psycopg.Error) -> ShipError:
        self.close()  # a new session next time: a fresh temporary table, like the table as it is then
        return ShipError(f"usage records not shipped: the staging table refuses any record "
                         f"({type(error).__name__}: {error}); every segment stays")

    def _insert(self, rows: list[tuple[Any, ...]], conninfo: str, *, rollback: bool = False) -> int:
        """Insert the rows in one transaction (rolled back if `rollback`); returns how many were new."""
        connection = self._connect(conninfo)
        cols = ", ".join(COLUMNS)
        with connection.transaction(force_rollback=rollback), connection.cursor() as cursor:
            # In the transaction, not as startup options a pooler (PgBouncer) may refuse or ignore: the
            # rollup's look-back relies on no shipment committing later than these after its INSERT read
            # the clock. The statement timeout bounds the INSERT; the idle timeout the wait between it and
            # the COMMIT (a paused or partitioned shipper): past it Postgres aborts the transaction and
            # ends the session, the COMMIT fails, the segments stay and the batch ships again.
            cursor.execute(f"SET LOCAL statement_timeout = {max(1, int(self.statement_timeout * 1000))}")
            cursor.execute(f"SET LOCAL idle_in_transaction_session_timeout = {max(1, int(self.idle_timeout * 1000))}")
            cursor.execute(
                "CREATE TEMP TABLE IF NOT EXISTS usage_incoming"
                " (LIKE metering_usagerecord INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
            with cursor.copy(f"COPY usage_incoming ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cursor.execute(
                f"INSERT INTO metering_usagerecord ({cols}, received_at)"
                f" SELECT {cols}, clock_timestamp() FROM usage_incoming ON CONFLICT (id) DO NOTHING"
            )
            return max(0, cursor.rowcount)

    def _connect(self, conninfo: str) -> psycopg.Connection[Any]:
        if self._connection is not None and (self._connection.closed or conninfo != self._conninfo):
            self.close()
        if self._connection is None:
            self._connection = psycopg.connect(conninfo, connect_timeout=2, autocommit=True)
            self._conninfo = conninfo
        return self._connection


def reship_rejected(directory: Path) -> list[Path]:
    """Move every file of `<directory>/rejected/` back into the spool as a segment (after the cause
    was fixed: a deploy's column, a constraint); the next shipment ships them, and sets aside again
    whatever the table still refuses. Returns the new segments' paths."""
    directory = Path(directory)
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for path in sorted((directory / "rejected").glob(f"*{_SUFFIX}")):
        with open(path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # no shipper is appending a reject to it meanwhile
            if not _linked(handle, path):
                continue
            target = directory / f"reshipped-{stamp}-{path.name}"
            os.rename(path, target)
            moved.append(target)
    if moved:
        fsync_dir(directory)
        fsync_dir(directory / "rejected")
    return moved


class ShipperThread:
    """Ships the spool every `interval` seconds (sooner when a segment fills), backing off with
    jitter while the staging table is away; no restart is needed when it comes back."""

    def __init__(self, shipper: Shipper, *, conninfo: Any, interval: float, wake: threading.Event) -> None:
        self.shipper = shipper
        self._conninfo = conninfo  # a callable, read at each attempt
        self.interval = interval
        self._wake = wake
        self._thread = threading.Thread(target=self._run, name="usage-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        delay = self.interval
        failing = False
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            try:
                shipped = self.shipper.ship(conninfo=self._conninfo())
            except ShipError as e:
                if not failing:
                    log.warning("%s; retrying with backoff", e)
                failing = True
                delay = min(delay * 2, 30.0) * _jitter.uniform(0.8, 1.2)
                continue
            except Exception:
                log.exception("usage shipper failed")
                failing = True
                delay = min(delay * 2, 30.0) * _jitter.uniform(0.8, 1.2)  # not every second forever
                continue
            if failing:
                log.warning("usage records shipping again")
            failing = False
            delay = self.interval
            if shipped == 0:
                self.shipper.close()  # idle: hold no database connection
