"""The data plane's background work against the real Postgres: the snapshot file a process starts
from when the database is away, and the counters every process flushes once a second."""
from __future__ import annotations

import threading

import pytest
from django.db import connection

from identity.dataplane import CredentialCache, QuotaUnconfirmed, _month
from identity.models import Plan, QuotaUsage
from identity.services import api_key_create, api_key_revoke, customer_create

pytestmark = pytest.mark.django_db(transaction=True)


def _cache(tmp_path, name: str = "snapshot.json") -> CredentialCache:
    return CredentialCache(poll_seconds=1, resync_seconds=300, max_staleness_seconds=900,
                           snapshot_path=tmp_path / name, background=False, process_name=f"test-{name}")


def _assert_refused(cache: CredentialCache, key: str) -> None:
    """The key is not accepted: unknown or revoked (unauthorized)."""
    with pytest.raises(Exception) as refused:
        cache.authenticate(key)
    assert getattr(refused.value, "code", None) == "unauthorized"


def _quota_customer(name: str, quota: int, used: int = 0):
    """A customer on a plan of `quota` images a month (rate out of the way), `used` of them this
    month already; returns it and a key of its."""
    plan = Plan.objects.create(name=f"quota-{name}", rate_per_second=100, burst=100, monthly_quota=quota)
    customer = customer_create(name=name, plan=plan)
    _, key = api_key_create(customer=customer)
    if used:
        QuotaUsage.objects.create(customer=customer, month=_month(), used=used)
    return customer, key


def test_a_process_started_from_the_file_knows_the_latest_revocation_and_the_quota_used(tmp_path):
    """The file was written only by the full resync (every 5 minutes): a process started from it
    during a database outage took back a key revoked since, and began with every quota unused and
    with the whole of each rate (as if it were the only process)."""
    plan = Plan.objects.create(name="quota-3", rate_per_second=100, burst=100, monthly_quota=3)
    customer = customer_create(name="filed", plan=plan)
    key_row, key = api_key_create(customer=customer)
    _, other_key = api_key_create(customer=customer)
    running = _cache(tmp_path)
    running.sync(full=True)
    principal = running.authenticate(key)
    for _ in range(3):
        assert running.charge_quota(principal)
    running.sync(full=False)  # flushed: 3 of 3 used
    api_key_revoke(api_key=key_row, actor="test")
    running.sync(full=False)  # the revocation, from the change feed: the file follows

    started_in_outage = _cache(tmp_path)  # never syncs: it has the file only
    _assert_refused(started_in_outage, key)
    other = started_in_outage.authenticate(other_key)
    assert not started_in_outage.charge_quota(other)  # the month's 3 images are used
    assert started_in_outage.processes == running.processes >= 1


def test_two_processes_flushing_the_same_customers_never_deadlock(tmp_path):
    """Each process upserts its customers' quota counts in one transaction every second. In the order
    each process first charged them, two processes took the same rows' locks in opposite orders:
    Postgres aborted one flush (after deadlock_timeout), the counts waited, the heartbeat was lost."""
    plan = Plan.objects.create(name="quota-big", rate_per_second=1000, burst=1000, monthly_quota=10**9)
    customers = [customer_create(name=f"shared-{i}", plan=plan) for i in range(20)]
    keys = [api_key_create(customer=c)[1] for c in customers]
    caches = [_cache(tmp_path, f"p{i}.json") for i in range(2)]
    for cache in caches:
        cache.sync(full=True)
    principals = [[cache.authenticate(k) for k in keys] for cache in caches]
    errors: list[BaseException] = []
    rounds = 40

    def flush(i: int, barrier: threading.Barrier) -> None:
        order = principals[i] if i == 0 else principals[i][::-1]  # opposite orders
        try:
            for _ in range(rounds):
                for principal in order:
                    caches[i].charge_quota(principal)
                barrier.wait()
                caches[i]._heartbeat_and_flush()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()
        finally:
            connection.close()

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=flush, args=(i, barrier)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    used = dict(QuotaUsage.objects.filter(month=_month()).values_list("customer_id", "used"))
    assert all(used[c.id] == 2 * rounds for c in customers)


def test_the_change_feed_and_the_heartbeat_are_timed_by_the_database(monkeypatch, tmp_path):
    """The look-back window (changes of the last 30 s are re-read) and the count of live processes
    compare with the database's now(): rows stamped by an API host whose clock runs behind fell
    outside them (a late-committing change waited for the full resync; the process went uncounted)."""
    from datetime import timedelta

    from django.utils import timezone

    from identity.models import ApiProcess, Change

    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - timedelta(hours=1))  # this host's clock
    customer = customer_create(name="clocked")
    cache = _cache(tmp_path)
    cache.sync(full=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT created_at > now() - interval '30 seconds' FROM identity_change WHERE id = %s",
                       [Change.objects.filter(customer_id=customer.id).latest("id").id])
        assert cursor.fetchone()[0]
    seen = ApiProcess.objects.get(name=cache.process_name).seen_at
    assert abs((seen - real_now()).total_seconds()) < 60
    assert cache.processes >= 1


def test_a_customer_at_its_plans_rate_is_not_refused_for_its_requests_spreading_over_processes(tmp_path,
                                                                                              monkeypatch):
    """Each process held burst/N tokens (about one): a customer sending at its plan's rate, its
    requests spread at random over the processes, was refused about half the time (0.50 here), where
    one shared bucket admits 0.86. The arithmetic alone: four caches that count four processes, a
    clock of the test's, Poisson arrivals at 2/s on a plan of 2/s with a burst of 4 (seeded)."""
    import random

    from identity import dataplane
    from identity.dataplane import Principal

    import time as real_time
    import types

    clock = [1000.0]
    # The data plane's clock only (not the time module's: other threads of this process use it).
    monkeypatch.setattr(dataplane, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=real_time.time,
                                                                 sleep=real_time.sleep))
    caches = [_cache(tmp_path, f"p{i}.json") for i in range(4)]
    for cache in caches:
        cache.processes = 4
    customer = Principal(customer_id="c", key_id="k", key_prefix="p", scopes=frozenset({"resize"}),
                         rate_per_second=2.0, burst=4, monthly_quota=None)
    rng = random.Random(7)
    waits = []
    for _ in range(2000):
        clock[0] += rng.expovariate(2.0)
        waits.append(rng.choice(caches).admit(customer))
    admitted = sum(1 for w in waits if w == 0) / len(waits)
    assert admitted >= 0.75, admitted
    # A refused request may retry after 1/r (another process may have a token), not N times that.
    assert max(waits) <= 1 / customer.rate_per_second + 1e-9


def test_a_first_snapshot_file_carries_the_process_count_and_the_quota_used(tmp_path):
    """A process's first full sync wrote its file before its first heartbeat and quota read: the file
    said "1 process, no quota used" until the next full sync (5 minutes), and a process started from
    it during a database outage took every customer's whole rate and quota."""
    _, key = _quota_customer("first-file", 2, used=2)
    other = _cache(tmp_path, "other.json")
    other.sync(full=True)  # another live process, heartbeating
    fresh = _cache(tmp_path, "fresh.json")
    fresh.sync(full=True)
    assert fresh.processes >= 2
    started_in_outage = _cache(tmp_path, "fresh.json")  # never syncs: the file only
    assert started_in_outage.processes == fresh.processes
    assert not started_in_outage.charge_quota(started_in_outage.authenticate(key))  # 2 of 2 used


def test_counts_of_a_month_that_ended_during_a_failed_flush_are_not_charged_to_the_next(tmp_path, monkeypatch):
    from identity import dataplane, services

    customer, key = _quota_customer("month-end", 10)
    cache = _cache(tmp_path)
    cache.sync(full=True)
    principal = cache.authenticate(key)
    for _ in range(5):
        assert cache.charge_quota(principal)
    old_month = _month()
    new_month = old_month.replace(year=old_month.year + 1)

    def month_ends_then_flush_fails(**kwargs):
        monkeypatch.setattr(dataplane, "_month", lambda: new_month)
        assert cache.charge_quota(principal)  # a request in the new month rolls it
        raise RuntimeError("the flush failed")

    monkeypatch.setattr(services, "api_keys_touch", month_ends_then_flush_fails)
    with pytest.raises(RuntimeError):
        cache.sync(full=False)
    monkeypatch.undo()
    monkeypatch.setattr(dataplane, "_month", lambda: new_month)
    cache.sync(full=False)
    assert QuotaUsage.objects.get(customer=customer, month=new_month).used == 1


def test_with_stale_totals_each_process_admits_only_its_share_of_the_quota_left(tmp_path):
    """While the totals cannot be read (Postgres away, flushes failing), each of N processes counted
    its own admissions against the last total only, and could admit the whole remainder: N times it."""
    customer, key = _quota_customer("outage-quota", 10, used=8)
    a, b = _cache(tmp_path, "a.json"), _cache(tmp_path, "b.json")
    for cache in (a, b, a):
        cache.sync(full=True)
    assert a.processes == b.processes == 2 and a._quota_used[str(customer.id)] == 8
    # With fresh totals either process may take all that is left (here: two, then used up)...
    assert a.charge_quota(a.authenticate(key)) and a.charge_quota(a.authenticate(key))
    assert not a.charge_quota(a.authenticate(key))
    a.refund_quota(a.authenticate(key))
    a.refund_quota(a.authenticate(key))
    for cache in (a, b):
        cache._quota_read_at = float("-inf")  # from here on no flush reads the totals (an outage)

    def charge(cache: CredentialCache) -> str:
        try:
            return "admitted" if cache.charge_quota(cache.authenticate(key)) else "used up"
        except QuotaUnconfirmed:
            return "unconfirmed"  # a short retry (503 quota_unconfirmed), not "come back next month"

    assert [charge(cache) for cache in (a, a, b, b)] == ["admitted", "unconfirmed", "admitted", "unconfirmed"]


def test_close_flushes_the_last_counts_and_no_round_runs_after_it(tmp_path):
    from identity.models import ApiProcess

    customer, key = _quota_customer("closing", 10)
    cache = _cache(tmp_path)
    cache.sync(full=True)
    assert ApiProcess.objects.filter(name=cache.process_name).exists()
    for _ in range(3):
        assert cache.charge_quota(cache.authenticate(key))
    cache.close()
    assert QuotaUsage.objects.get(customer=customer, month=_month()).used == 3
    assert not ApiProcess.objects.filter(name=cache.process_name).exists()
    cache.sync(full=False)  # a round the background thread had already begun: nothing happens
    assert not ApiProcess.objects.filter(name=cache.process_name).exists()


def _raw():
    """A second session on the test database (another API process, or a writer)."""
    import psycopg

    from tests.processes import database_url_for_tests

    return psycopg.connect(database_url_for_tests())


def _round(cache: CredentialCache, errors: list[Exception]) -> None:
    """One poller round on a thread of its own, as the background thread runs it."""
    try:
        cache.sync(full=False)
    except Exception as e:  # noqa: BLE001 - recorded for the test
        errors.append(e)
    finally:
        connection.close()


def test_a_peer_stalled_in_its_flush_does_not_stop_revocations_reaching_this_process(tmp_path, monkeypatch):
    """Another process's flush updated a busy customer's quota row and stalled inside its transaction
    (its host paused): this process's flush waited on that row lock without bound, its rounds stopped,
    and no revocation reached it (found by review: still accepted 6 s after, against the 5 s bound).
    The flush now gives up on a held lock (its counts kept for the next round) and the round ends."""
    import identity.dataplane as dataplane

    monkeypatch.setattr(dataplane, "FLUSH_LOCK_TIMEOUT_MS", 300)
    busy, busy_key = _quota_customer("busy", 10**6, used=1)
    victim = customer_create(name="victim")
    victim_row, victim_key = api_key_create(customer=victim)
    cache = _cache(tmp_path)
    cache.sync(full=True)
    busy_principal = cache.authenticate(busy_key)
    cache.authenticate(victim_key)
    peer = _raw()
    peer.execute("UPDATE identity_quotausage SET used = used + 1 WHERE customer_id = %s", [busy.pk])
    errors: list[Exception] = []
    try:
        assert cache.charge_quota(busy_principal)  # a count of busy's to flush: the flush needs that row
        first = threading.Thread(target=_round, args=(cache, errors), daemon=True)
        first.start()
        first.join(30)  # a deadline for waiting, not a measurement: unbounded, it waited for the peer
        assert not first.is_alive()
        assert len(errors) == 1 and "lock timeout" in str(errors[0]), errors
        api_key_revoke(api_key=victim_row, actor="staff:ops")
        second = threading.Thread(target=_round, args=(cache, errors), daemon=True)
        second.start()
        second.join(30)
        assert not second.is_alive()
        _assert_refused(cache, victim_key)  # the revocation is followed while the lock is held
    finally:
        peer.rollback()
        peer.close()
    cache.sync(full=False)  # the lock gone: the count kept from the failed flushes reaches the total
    assert QuotaUsage.objects.get(customer=busy, month=_month()).used == 2


def test_a_process_stalled_inside_its_flush_has_its_transaction_ended_by_the_server(tmp_path, monkeypatch):
    """The other half: the stalled process's own flush transaction is ended by the server once idle
    (idle_in_transaction_session_timeout), so its row locks do not outlive a pause of its host; the
    counts it was flushing are kept for its next round."""
    import identity.dataplane as dataplane
    import identity.services

    monkeypatch.setattr(dataplane, "FLUSH_IDLE_TIMEOUT_MS", 500)
    busy, busy_key = _quota_customer("paused", 10**6, used=1)
    cache = _cache(tmp_path)
    cache.sync(full=True)
    assert cache.charge_quota(cache.authenticate(busy_key))
    touched = threading.Event()
    released = threading.Event()
    real_touch = identity.services.api_keys_touch

    def paused_touch(**kwargs):  # the process stops here, inside its flush, after its quota update
        touched.set()
        released.wait(30)
        return real_touch(**kwargs)

    monkeypatch.setattr(identity.services, "api_keys_touch", paused_touch)
    errors: list[Exception] = []
    stalled = threading.Thread(target=_round, args=(cache, errors), daemon=True)
    stalled.start()
    assert touched.wait(30)
    peer = _raw()
    try:
        # Waits until the server ends the paused transaction (a deadline, not a measurement: unbounded,
        # the lock was held for as long as the pause).
        peer.execute("SET lock_timeout = 20000")
        peer.execute("UPDATE identity_quotausage SET used = used + 1 WHERE customer_id = %s", [busy.pk])
        peer.commit()
    finally:
        peer.close()
        released.set()
        stalled.join(30)
    assert errors  # the paused flush failed (its connection ended), not committed
    monkeypatch.setattr(identity.services, "api_keys_touch", real_touch)
    cache.sync(full=False)
    assert QuotaUsage.objects.get(customer=busy, month=_month()).used == 3  # 1 + the peer's 1 + ours, once


def test_a_change_committed_late_is_applied_after_a_feed_gap_longer_than_the_lookback(tmp_path, settings):
    """A revocation whose feed row took id N but committed after N+1 had been read: the look-back
    re-reads it, but it was counted back from now, so a process that could not read the feed for
    longer than the look-back skipped it until the next full resync (found by review). It is counted
    back from the last successful read now."""
    import time

    settings.AUTH_FEED_LOOKBACK_SECONDS = 2  # 30 s in production, scaled down
    a = customer_create(name="late-a")
    a_row, a_key = api_key_create(customer=a)
    b = customer_create(name="late-b")
    cache = _cache(tmp_path)
    cache.sync(full=True)
    writer = _raw()
    writer.execute("UPDATE identity_apikey SET revoked_at = now() WHERE id = %s", [a_row.pk])
    writer.execute("INSERT INTO identity_change (customer_id) VALUES (%s)", [a.pk])
    api_key_create(customer=b)  # feed row N+1, committed first
    cache.sync(full=False)  # reads N+1: its version passes N
    writer.commit()
    writer.close()
    time.sleep(2.5)  # this process's reads fail meanwhile (Postgres away from it): longer than the look-back
    cache.sync(full=False)
    _assert_refused(cache, a_key)


def _two_processes_sharing_a_file_then_a_revocation(tmp_path) -> tuple[str, CredentialCache, CredentialCache]:
    """Two processes of one host (one snapshot file), both synced; then a key of theirs is revoked,
    which neither has read yet. Returns the key and the two caches."""
    key_row, key = api_key_create(customer=customer_create(name="shared-file"))
    behind, ahead = _cache(tmp_path, "shared.json"), _cache(tmp_path, "shared.json")
    behind.sync(full=True)
    ahead.sync(full=True)
    api_key_revoke(api_key=key_row, actor="test")
    return key, behind, ahead


def test_a_process_behind_does_not_overwrite_a_newer_snapshot_file(tmp_path):
    """Processes on a host share the file. One behind the feed (its full reload read the keys before
    a revocation, and wrote the file after its heartbeat and flush) replaced a file that already had
    the revocation: a process started from it in an outage took the revoked key back (found by review)."""
    key, behind, ahead = _two_processes_sharing_a_file_then_a_revocation(tmp_path)
    ahead.sync(full=False)  # writes the revocation to the file
    behind._save_file()  # its older snapshot
    started_in_outage = _cache(tmp_path, "shared.json")
    _assert_refused(started_in_outage, key)


def test_a_newer_snapshot_file_written_during_anothers_save_is_not_replaced(tmp_path, monkeypatch):
    """The version check and the rename were apart (the document's serialization between them): a
    process behind that passed its check replaced a file another process wrote meanwhile, revocation
    and all (found by review). Both are under one lock of the host's processes now."""
    import identity.dataplane as dataplane

    key, behind, ahead = _two_processes_sharing_a_file_then_a_revocation(tmp_path)
    real_write_text = dataplane.Path.write_text
    raced = []

    def write_text(path, text, *args, **kwargs):  # behind is writing its file: ahead saves the revocation now
        written = real_write_text(path, text, *args, **kwargs)
        if not raced and path.name.startswith("shared.tmp"):
            raced.append(path)
            real_getpid = dataplane.os.getpid
            monkeypatch.setattr(dataplane.os, "getpid", lambda: 999_999)  # another process: its own temporary file
            try:
                ahead.sync(full=False)
            finally:
                monkeypatch.setattr(dataplane.os, "getpid", real_getpid)
        return written

    monkeypatch.setattr(dataplane.Path, "write_text", write_text)
    behind._save_file()
    monkeypatch.undo()
    assert raced
    started_in_outage = _cache(tmp_path, "shared.json")
    _assert_refused(started_in_outage, key)
    assert not list(tmp_path.glob("shared.tmp*"))


def _restore_to_before_a_new_key(tmp_path) -> tuple[str, str, CredentialCache]:
    """A process follows the feed to a new key (and writes it to the host's file); then the database
    is restored from a backup taken before that key: its rows and its feed row are gone, and the feed's
    sequence is back where the backup left it. Returns an older key, the lost key and the process."""
    customer = customer_create(name="restored")
    _, kept_key = api_key_create(customer=customer)
    running = _cache(tmp_path, "restored.json")
    running.sync(full=True)
    lost_row, lost_key = api_key_create(customer=customer)
    running.sync(full=False)
    running.authenticate(lost_key)
    with connection.cursor() as cursor:  # the restore
        cursor.execute("DELETE FROM identity_change WHERE id = (SELECT max(id) FROM identity_change)")
        cursor.execute("DELETE FROM identity_apikey WHERE id = %s", [lost_row.pk])
        # The backup is older than the look-back (its changes are not re-read every round anyway).
        cursor.execute("UPDATE identity_change SET created_at = created_at - interval '1 hour'")
        cursor.execute("SELECT setval(pg_get_serial_sequence('identity_change', 'id'),"
                       " (SELECT max(id) FROM identity_change))")
    return kept_key, lost_key, running


def test_a_snapshot_file_from_before_a_database_restore_is_replaced(tmp_path):
    """The file's version was ahead of the restored feed, so every process's file counted as older than
    it and was never written: a process started in an outage took the restored-away key, until the feed
    passed the old version (suspected in the seventh session, confirmed and fixed in the eighth)."""
    kept_key, lost_key, _ = _restore_to_before_a_new_key(tmp_path)
    restarted = _cache(tmp_path, "restored.json")
    restarted.sync(full=True)  # a process started after the restore: its full reload writes the file
    started_in_outage = _cache(tmp_path, "restored.json")
    started_in_outage.authenticate(kept_key)
    _assert_refused(started_in_outage, lost_key)


def test_a_running_process_reloads_when_the_change_feed_goes_back(tmp_path):
    """A process that lived through a restore kept the key the restore took away, and skipped changes
    whose ids it had seen before the restore (older than the look-back) until its next full resync, up
    to 5 minutes on. A feed behind the process now reloads everything at once."""
    kept_key, lost_key, running = _restore_to_before_a_new_key(tmp_path)
    running.sync(full=False)
    running.authenticate(kept_key)
    _assert_refused(running, lost_key)
    started_in_outage = _cache(tmp_path, "restored.json")  # the file followed
    _assert_refused(started_in_outage, lost_key)


def test_a_running_process_reloads_when_changes_after_a_restore_reuse_its_feed_id(tmp_path):
    """After the restore, another customer's change took the feed id the process had read last, before
    the process's next round: the head was back at the process's id, not behind it, the round re-read
    only that customer, and the restored-away key worked until the next full resync (up to 5 minutes).
    The row at the process's id now has another stamp, which reloads everything."""
    kept_key, lost_key, running = _restore_to_before_a_new_key(tmp_path)
    customer_create(name="after the restore")  # its feed row takes the lost key's id
    with connection.cursor() as cursor:
        cursor.execute("SELECT max(id) FROM identity_change")
        assert cursor.fetchone()[0] == running.version
    running.sync(full=False)
    running.authenticate(kept_key)
    _assert_refused(running, lost_key)


def test_a_snapshot_file_from_before_a_restore_is_replaced_after_its_feed_id_is_reused(tmp_path):
    """The file was written before the restore, at the lost key's feed id; a change since took that id
    again, so the feed was no longer behind the file, and a process that had read less than the file
    kept it (it counted as another process's newer read): a process started in an outage took the
    restored-away key. The stamp of the file's feed row tells the two apart."""
    kept_key, lost_key, _ = _restore_to_before_a_new_key(tmp_path)
    restarted = _cache(tmp_path, "elsewhere.json")
    restarted.sync(full=True)  # it read the restored feed before the next change
    customer_create(name="after the restore")  # its feed row takes the id of the file's version
    restarted.snapshot_path = tmp_path / "restored.json"
    restarted._save_file()
    started_in_outage = _cache(tmp_path, "restored.json")
    started_in_outage.authenticate(kept_key)
    _assert_refused(started_in_outage, lost_key)
