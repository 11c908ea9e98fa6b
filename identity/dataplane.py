"""The data plane: every request is authenticated, rate-limited and quota-checked from memory.

Each API process keeps a snapshot of the credentials (prefix -> hash, scopes, expiry, customer
status, plan limits) and follows the management plane's change feed on a background thread:
incrementally every AUTH_POLL_SECONDS, in full every AUTH_RESYNC_SECONDS. Nothing here touches the
database on the request path. When Postgres is away the last good snapshot keeps serving for up to
AUTH_MAX_STALENESS_SECONDS (it is also kept on disk, for a process restarted during an outage).
See docs/adr/0003-identity-planes.md.
"""
from __future__ import annotations

import fcntl
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from controlplane.per_process import PerProcess
from identity.keys import key_hash, key_prefix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request: a customer acting through one of its keys."""

    customer_id: str
    key_id: str
    key_prefix: str
    scopes: frozenset[str]
    rate_per_second: float
    burst: int
    monthly_quota: int | None
    is_authenticated: bool = True
    is_staff: bool = False


@dataclass(frozen=True)
class Credential:
    key_id: str
    customer_id: str
    secret_hash: str
    scopes: tuple[str, ...]
    expires_at: float | None
    customer_active: bool
    rate_per_second: float
    burst: int
    monthly_quota: int | None


class AuthFailed(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


class AuthUnavailable(Exception):
    """No snapshot fresh enough to trust: the node cannot decide who is calling."""


_CREDENTIALS_SQL = """
SELECT k.prefix, k.id, k.customer_id, k.secret_hash, k.scopes, k.expires_at,
       c.status, p.rate_per_second, p.burst, p.monthly_quota, p.id IS NOT NULL
FROM identity_apikey k
JOIN identity_customer c ON c.id = k.customer_id
LEFT JOIN identity_plan p ON p.id = c.plan_id
WHERE k.revoked_at IS NULL
"""


def _credential(row: tuple[Any, ...]) -> tuple[str, Credential]:
    prefix, key_id, customer_id, secret_hash, scopes, expires_at, status, rate, burst, quota, has_plan = row
    if isinstance(scopes, str):
        scopes = json.loads(scopes)
    if not has_plan:
        rate, burst, quota = (settings.DEFAULT_PLAN_RATE_PER_SECOND, settings.DEFAULT_PLAN_BURST,
                              settings.DEFAULT_PLAN_MONTHLY_QUOTA)
    return prefix, Credential(
        key_id=str(key_id), customer_id=str(customer_id), secret_hash=secret_hash, scopes=tuple(scopes),
        expires_at=expires_at.timestamp() if expires_at else None, customer_active=status == "active",
        rate_per_second=float(rate), burst=int(burst), monthly_quota=quota,
    )


@dataclass
class _Bucket:
    tokens: float
    updated: float


# The heartbeat's and the quota flush's transactions wait at most this long for a row lock, and are
# ended by the server after this long idle: one process paused inside its flush (a stopped container, a
# partition) held a busy customer's quota row until Postgres's TCP keepalive gave up (hours), every
# other process's round waited on it, and none followed the feed: revocations stopped reaching them,
# and after 15 minutes every request was 503 (found by review, 2026-11-22). Now a round that meets a
# held lock fails its flush (the counts are kept for the next) and the next round follows the feed.
FLUSH_LOCK_TIMEOUT_MS = 1000
FLUSH_IDLE_TIMEOUT_MS = 5000


def _bounded_waits(cursor: Any) -> None:
    cursor.execute(f"SET LOCAL lock_timeout = {int(FLUSH_LOCK_TIMEOUT_MS)}")
    cursor.execute(f"SET LOCAL statement_timeout = {int(FLUSH_IDLE_TIMEOUT_MS)}")
    cursor.execute(f"SET LOCAL idle_in_transaction_session_timeout = {int(FLUSH_IDLE_TIMEOUT_MS)}")


class QuotaUnconfirmed(Exception):
    """The monthly quota cannot be confirmed now (totals stale): a short retry, not a month's wait."""


LOCAL_BURST_FLOOR = 4.0  # tokens a process may hold for a customer, whatever its share (see admit)


@dataclass
class CredentialCache:
    poll_seconds: float
    resync_seconds: float
    max_staleness_seconds: float
    snapshot_path: Path | None
    background: bool = True  # False: the caller drives sync() (tests inside one transaction)
    process_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def __post_init__(self) -> None:
        self._by_prefix: dict[str, Credential] = {}
        self._prefixes_of: dict[str, set[str]] = {}
        self._last_change_id = 0
        self.synced_at: float | None = None  # wall time of the last successful sync
        self.version = 0  # the highest change-feed id applied
        self.processes = 1  # API processes sharing each customer's rate limit
        self._lock = threading.Lock()
        # Set once the first sync from Postgres has been tried: until then a snapshot read from
        # disk is not served (it may be older than what Postgres would give in a moment).
        self._first_sync = threading.Event()
        self._buckets: dict[str, _Bucket] = {}
        self._quota_used: dict[str, int] = {}  # customer -> admitted this month, all processes
        self._quota_read_at = float("-inf")  # when _quota_used was last read from Postgres
        self._quota_pending: dict[str, int] = {}  # customer -> admitted here, not yet flushed
        self._quota_flushing: dict[str, int] = {}  # customer -> admitted here, being flushed now
        self._quota_month = _month()
        self._last_used: dict[str, datetime] = {}
        # A process that starts from the file reloads everything first, whatever the machine's uptime
        # (time.monotonic() counts from boot: within 5 minutes of one, 0.0 read as "reloaded just now").
        self._last_full = float("-inf")
        self._feed_read_at: datetime | None = None  # the database's clock at the last successful feed read
        # The stamp of the feed row _last_change_id, as read from Postgres (None: not read, e.g. from the
        # file). A restored database gives that id out again, to a row with another stamp.
        self._last_change_stamp: datetime | None = None
        # Held by each sync round and by close(): a round in progress ends before the process says goodbye.
        self._round_lock = threading.Lock()
        self._closed = False
        self._load_file()
        if self.background:
            threading.Thread(target=self._run, name="identity-dataplane", daemon=True).start()

    # --- the request path (memory only) ---------------------------------------------------------

    def authenticate(self, key: str) -> Principal:
        if self.background and not self._first_sync.is_set():
            self._first_sync.wait(settings.AUTH_FIRST_SYNC_WAIT_SECONDS)
        if self.synced_at is None or time.time() - self.synced_at > self.max_staleness_seconds:
            raise AuthUnavailable()
        prefix = key_prefix(key)
        credential = self._by_prefix.get(prefix) if prefix else None
        # The hash is computed even for unknown prefixes, so timing does not tell them apart.
        presented = key_hash(key)
        if credential is None or not hmac.compare_digest(presented, credential.secret_hash):
            raise AuthFailed("unauthorized", "The API key is not valid, or it was revoked.")
        if credential.expires_at is not None and time.time() >= credential.expires_at:
            raise AuthFailed("unauthorized", "The API key has expired.")
        if not credential.customer_active:
            raise AuthFailed("customer_suspended", "This customer account is suspended.")
        self._last_used[credential.key_id] = datetime.now(timezone.utc)
        return Principal(customer_id=credential.customer_id, key_id=credential.key_id, key_prefix=prefix or "",
                         scopes=frozenset(credential.scopes), rate_per_second=credential.rate_per_second,
                         burst=credential.burst, monthly_quota=credential.monthly_quota)

    def admit(self, principal: Principal) -> float:
        """Take a token from the customer's bucket; 0 when admitted, else seconds until a retry is
        worth it. Each of the `processes` API processes holds an equal share of the customer's rate,
        and a bucket of at least min(burst, LOCAL_BURST_FLOOR) tokens: with burst/N (about one token
        each) a customer sending at its plan's rate, its requests spread at random over the
        processes, was refused half the time (a simulation of this arithmetic: 50% admitted at 2/s
        burst 4 on 4 processes, where one shared bucket admits 86%; with the floor 85%). The fleet's
        burst is then max(burst, N x min(burst, 4)) at most; its sustained rate stays r."""
        share = max(1, self.processes)
        rate = principal.rate_per_second / share
        capacity = max(1.0, principal.burst / share, min(float(principal.burst), LOCAL_BURST_FLOOR))
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(principal.customer_id)
            if bucket is None:
                bucket = self._buckets[principal.customer_id] = _Bucket(capacity, now)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            if rate <= 0:
                return 3600.0
            # This process's token comes at r/N; another process's may be there sooner: a retry is
            # worth it after 1/r (the wait at the plan's own rate), not N times that.
            return min((1.0 - bucket.tokens) / rate, 1.0 / principal.rate_per_second)

    def charge_quota(self, principal: Principal) -> bool:
        """Count one image against the monthly quota; False (and nothing counted) when it is used up.
        Raises QuotaUnconfirmed (nothing counted) when the totals are stale and this process's share of
        what was left is used: the rest may be there, so the client should retry soon, not next month."""
        if principal.monthly_quota is None:
            return True
        with self._lock:
            self._roll_month()
            customer = principal.customer_id
            read = self._quota_used.get(customer, 0)  # every process's, as last read from Postgres
            mine = self._quota_flushing.get(customer, 0) + self._quota_pending.get(customer, 0)
            if read + mine >= principal.monthly_quota:
                return False
            if time.monotonic() - self._quota_read_at > 3 * self.poll_seconds + 2:
                # The totals are stale (Postgres away, flushes failing, a process started from the
                # file): the other processes admit meanwhile too, unseen. Each takes its share of what
                # was left, not all of it: N processes each admitted the whole remainder before.
                if mine + 1 > math.ceil((principal.monthly_quota - read) / max(1, self.processes)):
                    raise QuotaUnconfirmed()
            self._quota_pending[customer] = self._quota_pending.get(customer, 0) + 1
            return True

    def refund_quota(self, principal: Principal) -> None:
        if principal.monthly_quota is None:
            return
        with self._lock:
            self._quota_pending[principal.customer_id] = self._quota_pending.get(principal.customer_id, 0) - 1

    def age(self) -> float | None:
        return None if self.synced_at is None else time.time() - self.synced_at

    # --- the background thread (the only code here that talks to Postgres) -----------------------

    def sync(self, *, full: bool) -> None:
        """One round: follow the feed (or reload everything), heartbeat, flush counters."""
        with self._round_lock:
            if self._closed:
                return
            self._sync(full=full)

    def close(self) -> None:
        """At the process's exit (gunicorn's worker_exit): flush the quota counts admitted since the last
        round (up to a second of them: lost otherwise, and the month's totals short by that much) and
        delete this process's heartbeat, so the others' shares of every rate grow at once instead of
        after AUTH_PROCESS_EXPIRY_SECONDS. Best effort: with Postgres away the counts are lost, as a
        crash loses them. No round runs after it."""
        with self._round_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._flush()
                with transaction.atomic(), connection.cursor() as cursor:
                    cursor.execute("DELETE FROM identity_apiprocess WHERE name = %s", [self.process_name])
            except Exception as e:  # noqa: BLE001 - the process is exiting: say so, don't raise
                log.warning("identity data plane: final flush at exit failed (%s: %s); up to a second of "
                            "quota counts is lost", type(e).__name__, e)

    def _sync(self, *, full: bool) -> None:
        if not full:
            full = not self._sync_changes()  # False: the feed went back (a restored database)
        if full:
            self._sync_full()
            self._last_full = time.monotonic()
        # The credentials are fresh now, whatever the flush below does: a flush that fails (its
        # counts are kept for the next round) must not age the snapshot into 503s for everyone.
        self.synced_at = time.time()
        try:
            # Requests waiting for the first sync go on once the process count (each one's share of
            # a customer's rate) and the month's quota usage are known too, not before.
            self._heartbeat_and_flush()
        finally:
            if full:
                # After the heartbeat and the quota read: written before them, a process's first file
                # said "1 process, no quota used" until the next full sync, 5 minutes on, and a process
                # started from it in a database outage took every customer's whole rate and quota.
                self._save_file()
            self._first_sync.set()

    def _run(self) -> None:
        while not self._closed:
            started = time.monotonic()
            try:
                self.sync(full=self.synced_at is None or started - self._last_full >= self.resync_seconds)
            except Exception as e:
                age = self.age()
                log.warning("identity sync round failed (%s: %s); serving the snapshot from %s s ago",
                            type(e).__name__, e, "never" if age is None else f"{age:.0f}")
                connection.close()
                self._first_sync.set()  # serve the snapshot from disk, if there is one fresh enough
            time.sleep(max(0.05, self.poll_seconds - (time.monotonic() - started)))

    def _sync_full(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(id), 0), now() FROM identity_change")
            version, read_at = cursor.fetchone()
            stamp = _stamp_of(cursor, version)
            cursor.execute(_CREDENTIALS_SQL)
            by_prefix = dict(_credential(row) for row in cursor.fetchall())
        prefixes_of: dict[str, set[str]] = {}
        for prefix, credential in by_prefix.items():
            prefixes_of.setdefault(credential.customer_id, set()).add(prefix)
        with self._lock:
            self._by_prefix, self._prefixes_of = by_prefix, prefixes_of
            self._last_change_id = self.version = version
        self._last_change_stamp = stamp
        self._feed_read_at = read_at

    def _sync_changes(self) -> bool:
        """Apply the feed's changes since the last read; False (nothing applied) when the feed is behind
        this process, and everything must be reloaded."""
        # Feed ids can commit out of order (a lower id may appear after a higher one was read):
        # changes made up to AUTH_FEED_LOOKBACK_SECONDS before the last successful read are always
        # re-applied, which is idempotent. Counted back from that read, not from now: a process that
        # could not read the feed for longer than the look-back (Postgres away from it for a minute)
        # skipped a change that committed late meanwhile (a revocation honoured until the next full
        # resync, up to 5 minutes on; found by review, 2026-11-22).
        with connection.cursor() as cursor:
            read_at, feed_max, stamp, lost = _feed_head(cursor, self._last_change_id, self._last_change_stamp)
            if lost:
                # The feed went back: the database was restored from a backup taken before changes this
                # process applied. Ids below what it has read are given out again, and the look-back
                # would see only the last 30 s of them: reload everything now, not at the next resync.
                # Changes made since the restore may already have brought the head back to (or past)
                # this process's id; the row at that id is then another one, with another stamp
                # (until 2026-11-23 missed: the restored-away keys lived until the next full resync).
                log.warning("identity change feed %s this process's %s (a restored database?):"
                            " reloading every credential", f"is at {feed_max}, behind"
                            if feed_max < self._last_change_id else "has another row at", self._last_change_id)
                return False
            cursor.execute(
                "SELECT customer_id, max(id) FROM identity_change"
                " WHERE id > %s OR created_at > %s - %s * interval '1 second' GROUP BY customer_id",
                [self._last_change_id, self._feed_read_at or read_at, settings.AUTH_FEED_LOOKBACK_SECONDS],
            )
            changed = cursor.fetchall()
            if not changed:
                self._feed_read_at = read_at
                return True
            customers = [row[0] for row in changed]
            cursor.execute(_CREDENTIALS_SQL + " AND k.customer_id = ANY(%s)", [customers])
            fresh = [_credential(row) for row in cursor.fetchall()]
            last = max(self._last_change_id, *(row[1] for row in changed))
            if last != self._last_change_id:
                stamp = _stamp_of(cursor, last)
        # Built outside the lock (this thread is the only one that replaces the maps; requests read
        # the old map until the swap): the copy is O(all keys), and the lock is the one admit() and
        # charge_quota() take on every request: with 100k keys it was milliseconds a second, for the
        # 30 s look-back after any change.
        by_prefix = dict(self._by_prefix)
        before = {}
        for customer_id in customers:
            for prefix in self._prefixes_of.pop(str(customer_id), set()):
                before[prefix] = by_prefix.pop(prefix, None)
        for prefix, credential in fresh:
            by_prefix[prefix] = credential
            self._prefixes_of.setdefault(credential.customer_id, set()).add(prefix)
        with self._lock:
            self._by_prefix = by_prefix
            self._last_change_id = self.version = last
        self._last_change_stamp = stamp
        self._feed_read_at = read_at
        if before != dict(fresh):
            # A revocation, suspension or new key reaches the file too (not only at the next full
            # resync): a process that starts during a database outage must not bring back a revoked key.
            # The look-back re-reads recent changes every round; only a real difference is written.
            self._save_file()
        return True

    def _heartbeat_and_flush(self) -> None:
        # The heartbeat commits on its own: a flush that fails must not make the other processes stop
        # counting this one (their shares of every rate would grow). Times are the database's clock.
        with transaction.atomic(), connection.cursor() as cursor:
            _bounded_waits(cursor)
            cursor.execute(
                "INSERT INTO identity_apiprocess (name, seen_at) VALUES (%s, now())"
                " ON CONFLICT (name) DO UPDATE SET seen_at = EXCLUDED.seen_at", [self.process_name])
            cursor.execute("DELETE FROM identity_apiprocess WHERE seen_at < now() - %s * interval '1 second'",
                           [settings.AUTH_PROCESS_EXPIRY_SECONDS * 10])
            cursor.execute("SELECT count(*) FROM identity_apiprocess WHERE seen_at > now() - %s * interval '1 second'",
                           [settings.AUTH_PROCESS_EXPIRY_SECONDS])
            processes = cursor.fetchone()[0]
        with self._lock:
            self.processes = max(1, processes)
        self._flush()

    def _flush(self) -> None:
        """Add this process's quota counts to the month's totals, read the totals back, record keys' last use."""
        from identity.services import api_keys_touch

        with self._lock:
            # Counts being flushed still count against the quota until the flush reads them back.
            pending, self._quota_pending = self._quota_pending, {}
            self._quota_flushing = pending
            last_used, self._last_used = self._last_used, {}
            month = self._quota_month
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                _bounded_waits(cursor)
                # Rows in one order (customer, then key) in every process: two flushes taking the same
                # rows' locks in opposite orders deadlock (Postgres aborts one after deadlock_timeout).
                for customer_id, delta in sorted(pending.items()):
                    if delta > 0:
                        # Only for a customer that still exists (one deleted meanwhile must not fail
                        # the whole flush on the foreign key, every second from then on).
                        cursor.execute(
                            "INSERT INTO identity_quotausage (customer_id, month, used)"
                            " SELECT id, %s, %s FROM identity_customer WHERE id = %s"
                            " ON CONFLICT (customer_id, month) DO UPDATE SET used = identity_quotausage.used + EXCLUDED.used",
                            [month, delta, customer_id])
                    elif delta < 0:
                        # Refunds (a job the queue did not take) can outnumber this flush's charges: the
                        # charge was flushed already, or belongs to last month. Never below zero, and
                        # never an INSERT of a negative count (the CHECK would fail the flush for good).
                        cursor.execute(
                            "UPDATE identity_quotausage SET used = GREATEST(used + %s, 0)"
                            " WHERE customer_id = %s AND month = %s", [delta, customer_id, month])
                cursor.execute("SELECT customer_id, used FROM identity_quotausage WHERE month = %s", [month])
                used = {str(c): u for c, u in cursor.fetchall()}
                api_keys_touch(last_used=last_used)
        except Exception:
            with self._lock:  # not flushed: count it again next time
                self._quota_flushing = {}
                # Only within the same month: counts of a month that ended meanwhile (a request rolled
                # it) would be charged to the new one. They are dropped: quotas are limits, not bills.
                for customer_id, delta in (pending.items() if month == self._quota_month else ()):
                    self._quota_pending[customer_id] = self._quota_pending.get(customer_id, 0) + delta
                for key_id, at in last_used.items():
                    self._last_used.setdefault(key_id, at)
            raise
        with self._lock:
            self._quota_flushing = {}
            if month == self._quota_month:
                self._quota_used = used
                self._quota_read_at = time.monotonic()

    def _roll_month(self) -> None:
        month = _month()
        if month != self._quota_month:
            self._quota_month, self._quota_used, self._quota_pending, self._quota_flushing = month, {}, {}, {}

    # --- the on-disk copy, for a process that starts while Postgres is away ----------------------

    def _save_file(self) -> None:
        if self.snapshot_path is None:
            return
        with self._lock:
            # A process that starts from this file (Postgres away) shares rates and quotas as this one did.
            shares = {"processes": self.processes, "quota_month": self._quota_month.isoformat(),
                      "quota_used": dict(self._quota_used)}
        stamp = self._last_change_stamp.isoformat() if self._last_change_stamp else None
        document = {"synced_at": self.synced_at or time.time(), "version": self.version, "stamp": stamp,
                    "database": _database_identity(),
                    **shares, "credentials": {p: asdict(c) for p, c in self._by_prefix.items()}}
        tmp = self.snapshot_path.with_suffix(f".tmp{os.getpid()}")
        try:
            self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
            # Hashes only (no key can be rebuilt from them), but still nobody else's to read.
            tmp.touch(mode=0o600)
            tmp.write_text(json.dumps(document))
            # The check and the rename under one lock of the host's processes: another process on this
            # host may have written a newer file (a revocation this one has not read yet), and a full
            # reload's file, written after its heartbeat and flush, must not bring the key back. Checked
            # outside the lock, a newer file written between the check and the rename was replaced.
            with open(self.snapshot_path.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                on_file, on_file_stamp = _file_version(self.snapshot_path)
                if on_file > self.version and not _from_a_lost_future(on_file, on_file_stamp):
                    tmp.unlink()
                    return
                os.replace(tmp, self.snapshot_path)
        except OSError as e:
            log.warning("identity snapshot not saved to %s: %s", self.snapshot_path, e)

    def _load_file(self) -> None:
        if self.snapshot_path is None or not self.snapshot_path.exists():
            return
        try:
            document = json.loads(self.snapshot_path.read_text())
            if document.get("database") != _database_identity():
                return  # another database's credentials (a different deployment sharing the path)
            by_prefix = {p: Credential(**{**c, "scopes": tuple(c["scopes"])}) for p, c in document["credentials"].items()}
            synced_at, version = float(document["synced_at"]), int(document["version"])
            processes = max(1, int(document.get("processes", 1)))
            quota_used = ({str(c): int(u) for c, u in document.get("quota_used", {}).items()}
                          if document.get("quota_month") == self._quota_month.isoformat() else {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("identity snapshot file %s unreadable: %s", self.snapshot_path, e)
            return
        self._by_prefix = by_prefix
        for prefix, credential in by_prefix.items():
            self._prefixes_of.setdefault(credential.customer_id, set()).add(prefix)
        self.synced_at, self.version = synced_at, version
        self._last_change_id = self.version
        self.processes, self._quota_used = processes, quota_used


def _feed_head(cursor: Any, version: int, known_stamp: datetime | None) -> tuple[datetime, int, datetime | None, bool]:
    """(the database's clock, the feed's highest id, the stamp of its row `version`, and whether the feed
    lost what was read at `version`: its head is below it, or its row `version` is another one than
    `known_stamp` says; both mean a database restored from a backup taken before it)."""
    cursor.execute("SELECT now(), coalesce(max(id), 0), (SELECT created_at FROM identity_change WHERE id = %s)"
                   " FROM identity_change", [version])
    read_at, head, stamp = cursor.fetchone()
    return read_at, head, stamp, head < version or (known_stamp is not None and stamp != known_stamp)


def _stamp_of(cursor: Any, change_id: int) -> datetime | None:
    """The stamp of the change feed's row `change_id` (None if there is no such row)."""
    cursor.execute("SELECT created_at FROM identity_change WHERE id = %s", [change_id])
    row = cursor.fetchone()
    return row[0] if row else None


def _file_version(path: Path) -> tuple[int, str | None]:
    """The change-feed version of the snapshot file at `path` (of this database) and the stamp of the
    feed's row of that id (None if the file has none); 0 if there is no file or it is unreadable."""
    try:
        document = json.loads(path.read_text())
        if document.get("database") != _database_identity():
            return 0, None
        return int(document["version"]), document.get("stamp")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0, None


def _from_a_lost_future(version: int, stamp: str | None) -> bool:
    """Whether a file of feed `version` is from a future the database no longer has (it was restored
    from a backup taken before it), not another process's newer read: the feed has not reached
    `version`, or its row `version` is another one than the file's (changes made since the restore have
    given the id out again). Kept, such a file would bring back keys and revocations the restore undid
    for any process started from it in an outage. False if the database cannot be asked (the file is kept)."""
    try:
        with connection.cursor() as cursor:
            return _feed_head(cursor, version, datetime.fromisoformat(stamp) if stamp else None)[3]
    except Exception as e:  # noqa: BLE001 - keeping the file is the safe side
        log.warning("identity snapshot: could not read the change feed's head (%s: %s)", type(e).__name__, e)
        return False


def _database_identity() -> str:
    db = settings.DATABASES["default"]
    return f"{db.get('HOST')}:{db.get('PORT')}/{db.get('NAME')}"


def _month() -> date:
    return datetime.now(timezone.utc).date().replace(day=1)


def _credential_cache() -> CredentialCache:
    path = settings.AUTH_SNAPSHOT_PATH
    return CredentialCache(
        poll_seconds=settings.AUTH_POLL_SECONDS,
        resync_seconds=settings.AUTH_RESYNC_SECONDS,
        max_staleness_seconds=settings.AUTH_MAX_STALENESS_SECONDS,
        snapshot_path=Path(path) if path else None,
        background=settings.AUTH_SYNC_IN_BACKGROUND,
    )


# The process's cache, started on first use (its poller does not survive a fork). `.if_made()` for
# metrics (never starts one), `.reset()` for tests that change the database under it.
credential_cache = PerProcess(_credential_cache)
