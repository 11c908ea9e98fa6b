"""The staging store and job documents: atomic writes, create-if-absent, idempotency, sweeping."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest

from resizer.jobs import (IdempotencyConflict, job_create, job_load, job_result_open, job_save, job_succeed, output_key,
                          staging_sweep)
from resizer.staging import DirectoryStore, StagingError, StagingNotFound


@pytest.fixture
def store(tmp_path):
    return DirectoryStore(tmp_path / "staging")


def test_put_get_delete(store):
    store.put("a/b", b"1")
    store.put("a/b", b"2")
    assert store.get("a/b") == b"2"
    assert store.delete("a/b") is True
    assert store.delete("a/b") is False
    with pytest.raises(StagingNotFound):
        store.get("a/b")


def test_keys_cannot_escape_the_root(store):
    for key in ("../x", "/etc/passwd", "a/../../x", ""):
        with pytest.raises(ValueError):
            store.put(key, b"")


def test_put_new_has_exactly_one_winner_under_contention(store, monkeypatch):
    """Two put_new calls on one key, the second run inside the first one's window: after the first
    wrote its temporary file, just before it links (or renames) it into place. Threads racing freely
    hit that window only some of the time; here it is hit every time. Create-if-absent must still
    leave exactly one winner, whose content the key holds."""
    slot = store.root / "slot"
    results: dict[str, bool] = {}
    entered = []

    def inside_the_window(real):
        def commit(src, dst, *args, **kwargs):
            if os.fspath(dst) == os.fspath(slot) and not entered:  # the first call's commit, only
                entered.append(True)
                results["second"] = store.put_new("slot", b"second")
            return real(src, dst, *args, **kwargs)
        return commit

    for name in ("link", "replace", "rename"):
        monkeypatch.setattr(os, name, inside_the_window(getattr(os, name)))
    results["first"] = store.put_new("slot", b"first")
    monkeypatch.undo()
    assert entered  # the second call did run inside the first one's window
    assert sorted(results.values()) == [False, True], results  # exactly one winner
    winner = next(name for name, won in results.items() if won)
    assert store.get("slot") == winner.encode()


def _create(store, data=b"img", params=None, key=None, customer="c1"):
    return job_create(store, customer_id=customer, key_id="k", request_id="r", params=params or {"width": 1},
                      input_facts={}, data=data, idempotency_key=key)


def test_idempotency_same_request_same_job_different_request_conflicts(store):
    first, created = _create(store, key="K")
    again, created_again = _create(store, key="K")
    assert created and not created_again and again.id == first.id
    other_customer, created_other = _create(store, key="K", customer="c2")
    assert created_other and other_customer.id != first.id
    with pytest.raises(IdempotencyConflict):
        _create(store, key="K", params={"width": 2})
    # the loser's staged files were removed: only the two real jobs remain
    assert len(list(store.scan("jobs", depth=2))) == 2


def test_sweep_drops_expired_results_then_old_jobs(store):
    job, _ = _create(store)
    job = job_succeed(store, job, data=b"out", output={}, cpu_seconds=0.0, result_ttl_seconds=600)
    assert staging_sweep(store, job_retention_seconds=3600)["results"] == 0
    job.result_expires_at = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()  # its TTL is up
    job_save(store, job)
    assert staging_sweep(store, job_retention_seconds=3600)["results"] == 1
    with pytest.raises(StagingNotFound):
        job_result_open(store, job)
    assert job_load(store, job.id) is not None  # the document stays (GET says 410, not 404)
    old = time.time() - 7200
    os.utime(store.root / output_key(job.id).rsplit("/", 1)[0], (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["jobs"] == 1
    assert job_load(store, job.id) is None


def test_the_sweep_keeps_a_job_still_waiting_for_its_worker_longer(store):
    """Workers away for a day, or a dead-letter replay: a queued job's message may still come, so its
    input and document outlive the finished jobs' retention (7x), then go too."""
    waiting, _ = _create(store)
    done, _ = _create(store)
    job_succeed(store, done, data=b"out", output={}, cpu_seconds=0.0, result_ttl_seconds=600)
    for job, age in ((waiting, 7200), (done, 7200)):
        old = time.time() - age
        os.utime(store.root / output_key(job.id).rsplit("/", 1)[0], (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["jobs"] == 1
    assert job_load(store, done.id) is None and job_load(store, waiting.id) is not None
    old = time.time() - 8 * 3600
    os.utime(store.root / output_key(waiting.id).rsplit("/", 1)[0], (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["jobs"] == 1
    assert job_load(store, waiting.id) is None


class _KeyFreedMeanwhile(DirectoryStore):
    """The interleaving of two retries on one Idempotency-Key: between this request losing put_new
    and reading the slot, the other request frees the key (its publish failed)."""

    def put_new(self, key: str, data: bytes) -> bool:
        won = super().put_new(key, data)
        if not won and key.startswith("idempotency/") and not getattr(self, "freed", False):
            self.freed = True
            self.delete(key)
        return won


def test_an_idempotency_key_freed_between_the_race_and_the_read_makes_a_fresh_job(tmp_path):
    store = _KeyFreedMeanwhile(tmp_path / "staging")
    first, _ = _create(store, key="K")
    second, created = _create(store, key="K")  # raised StagingNotFound (a 500) before
    assert created and second.id != first.id and store.freed
    assert job_load(store, second.id) is not None


def test_the_sweep_removes_temporary_files_left_behind_by_a_killed_writer(store):
    """A process killed between writing a put's temporary file and renaming it leaves `.tmp-*` behind;
    under idempotency/ no job directory's removal ever takes it. The sweep removes such files by age
    (never a fresh one: a put holds its temporary file for milliseconds)."""
    _create(store, key="K")
    slot_dir = next((store.root / "idempotency").iterdir())
    stale, fresh = slot_dir / ".tmp-stale", slot_dir / ".tmp-fresh"
    stale.write_bytes(b"half a record")
    fresh.write_bytes(b"being written")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["idempotency"] == 1
    assert not stale.exists() and fresh.exists()
    assert len(list(slot_dir.iterdir())) == 2  # the fresh temporary file and the key's record


def test_a_directory_delete_that_fails_part_way_is_an_error(store):
    """rmtree with its errors ignored reported a job deleted while part of it was still there."""
    job, _ = _create(store)
    pinned = store.root / output_key(job.id)
    pinned.write_bytes(b"out")
    if os.geteuid() == 0:  # root deletes whatever the permissions say: the immutable attribute
        assert shutil.which("chattr"), "chattr is not installed (e2fsprogs)"
        if subprocess.run(["chattr", "+i", str(pinned)], capture_output=True).returncode != 0:
            pytest.skip("this filesystem has no immutable attribute, and root ignores permissions")

        def unpin() -> None:
            subprocess.run(["chattr", "-i", str(pinned)], check=True)
    else:  # anyone else: a directory it may not write to
        pinned.parent.chmod(0o500)

        def unpin() -> None:
            pinned.parent.chmod(0o700)
    try:
        with pytest.raises(StagingError):
            store.delete(output_key(job.id).rsplit("/", 1)[0])
        assert pinned.exists()
        # The sweep counts it failed (it tries again next time) and sweeps everything else.
        other, _ = _create(store)
        old = time.time() - 8 * 3600  # past even a queued job's retention
        for j in (job, other):
            os.utime(store.root / output_key(j.id).rsplit("/", 1)[0], (old, old))
        swept = staging_sweep(store, job_retention_seconds=3600)
        assert swept["failed"] == 1 and swept["jobs"] == 1 and job_load(store, other.id) is None
    finally:
        unpin()
    assert store.delete(output_key(job.id).rsplit("/", 1)[0]) is True
    assert not pinned.parent.exists()


def test_job_documents_read_across_versions(store):
    """A rolling deploy runs two versions at once: a field a newer version writes is ignored when read."""
    import json

    from resizer.jobs import _doc_key

    job, _ = _create(store)
    document = json.loads(store.get(_doc_key(job.id)))
    store.put(_doc_key(job.id), json.dumps({**document, "added_later": 1}).encode())
    assert job_load(store, job.id).id == job.id


def test_a_job_has_one_outcome_whoever_decides_first(store):
    """Deliveries of one job (copies of its message, a redelivery while the first still runs) and the
    API (failing a publish that looked lost) each claim the outcome; the first claim stands for all."""
    import dataclasses

    from resizer.jobs import job_decide, job_decision, job_mark_failed

    job, _ = _create(store)
    assert job_decision(store, job.id) is None
    succeeded = dataclasses.replace(job, status="succeeded", output={"format": "jpeg"})
    failed = job_mark_failed(dataclasses.replace(job), status=503, code="queue_unavailable", detail="lost")
    first, ours = job_decide(store, succeeded)
    assert ours and first.status == "succeeded"
    second, ours = job_decide(store, failed)
    assert not ours and second.status == "succeeded" and second.output == {"format": "jpeg"}
    assert job_decision(store, job.id).status == "succeeded"
    assert job_load(store, job.id).status == "queued"  # readers see it finished only once it is recorded


def test_the_sweep_removes_probe_files_a_killed_health_check_left_behind(store):
    """check() deletes its probe file, but a process killed between writing and deleting it left one
    per process and thread under health/, which nothing removed."""
    store.check()
    probes = store.root / "health"
    assert list(probes.iterdir()) == []
    stale, fresh = probes / "101-1", probes / "102-1"
    stale.write_bytes(b"ok")
    fresh.write_bytes(b"ok")  # a check in flight right now
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["probes"] == 1
    assert not stale.exists() and fresh.exists()


def test_an_unreadable_job_document_is_missing_not_a_crash_and_the_sweep_goes_on(store):
    """A host that crashed just after a write can leave an empty document (the rename is not fsynced):
    job_load raised, a GET of the job was a 500, and every sweep stopped at it, leaving the expired
    results after it in scan order (and every idempotency record and probe file) for ever."""
    from resizer.jobs import _doc_key, job_decision

    expired = []
    for _ in range(10):
        job, _ = _create(store)
        job = job_succeed(store, job, data=b"out", output={}, cpu_seconds=0.0, result_ttl_seconds=600)
        job.result_expires_at = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
        job_save(store, job)
        expired.append(job)
    broken, _ = _create(store)
    for content in (b"", b"{\"id\": ", b"[1, 2]", b"\xff\xfe", b"{}"):
        (store.root / _doc_key(broken.id)).write_bytes(content)
        assert job_load(store, broken.id) is None
    assert job_decision(store, broken.id) is None
    assert staging_sweep(store, job_retention_seconds=3600)["results"] == 10
    assert not any((store.root / output_key(job.id)).exists() for job in expired)
    old = time.time() - 7200
    os.utime(store.root / _doc_key(broken.id).rsplit("/", 1)[0], (old, old))
    assert staging_sweep(store, job_retention_seconds=3600)["jobs"] == 1  # gone with its age, like any job


def test_an_unreadable_idempotency_record_frees_its_key(store):
    """job_create took an unreadable record for "no record" and tried again, and again: staging the
    upload anew each time, ~2,000 times, until a RecursionError (a 500)."""
    from resizer.jobs import _idempotency_key

    first, created = _create(store, key="K")
    assert created
    (store.root / _idempotency_key("c1", "K")).write_bytes(b"")  # a crash right after the write
    again, created = _create(store, key="K")
    assert created and again.id != first.id  # the key was freed: a fresh job, once
    replay, created = _create(store, key="K")
    assert not created and replay.id == again.id  # and the key holds from then on


def test_the_sweep_leaves_its_mark_and_removes_a_marks_temporary_file_left_behind(store):
    """Each sweep writes sweep/finished (its age is on /metrics); a writer killed while writing it left
    a temporary file there that no sweep removed (found by the diff review)."""
    from resizer.jobs import SWEEP_MARK_KEY

    staging_sweep(store, job_retention_seconds=3600)
    assert (store.root / SWEEP_MARK_KEY).exists()
    left = store.root / "sweep" / ".tmp-killed"
    left.write_bytes(b"{")
    old = time.time() - 7200
    os.utime(left, (old, old))
    staging_sweep(store, job_retention_seconds=3600)
    assert not left.exists() and (store.root / SWEEP_MARK_KEY).exists()
