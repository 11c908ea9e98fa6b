"""The staging store: where uploads, results and job documents wait between API nodes and workers.

Messages on the queue carry only a job id; the bytes live here. The interface is deliberately
small (put, put_new, get, delete, scan, check) so an object store can stand in for the directory when API
nodes and workers are on different hosts (docs/adr/0002-staging-and-result-return.md).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse


PROBE_PREFIX = "health"  # check()'s probe files; the sweep removes any a killed process left behind
PROBE_RETENTION_SECONDS = 3600


class StagingError(Exception):
    """The staging store could not be reached or written (an infrastructure fault, never bad input)."""


class StagingNotFound(KeyError):
    """No object at that key."""


class StagingStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def put_new(self, key: str, data: bytes) -> bool:
        """Create `key` only if absent, atomically; False when it already existed."""
        ...

    def get(self, key: str) -> bytes: ...

    def open(self, key: str) -> BinaryIO:
        """The object at `key` to read in pieces (a result too large to hold whole)."""
        ...

    def delete(self, key: str) -> bool:
        """Delete `key` and everything under it as a prefix; False when there was nothing."""
        ...

    def scan(self, prefix: str, depth: int) -> Iterator[tuple[str, float]]:
        """Yield (key, age in seconds) of the entries `depth` levels below `prefix`."""
        ...

    def check(self) -> None:
        """Raise StagingError unless the store can be written and read back now (/readyz)."""
        ...


class DirectoryStore:
    """A directory on a local (or shared) filesystem. Writes are atomic: temp file, then rename/link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StagingError(f"staging directory {root} is unusable: {e}") from e

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad staging key {key!r}")
        return self.root / key

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            os.unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            os.replace(self._write_temp(path, data), path)
        except OSError as e:
            raise StagingError(f"staging write failed: {e}") from e

    def put_new(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)  # fails if path exists: create-if-absent with full content
                created = True
            except FileExistsError:
                created = False
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            raise StagingError(f"staging write failed: {e}") from e
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the key was made (or not) all the same; the sweep removes the temporary file by age
        return created

    def get(self, key: str) -> bytes:
        with self.open(key) as f:
            try:
                return f.read()
            except OSError as e:
                raise StagingError(f"staging read failed: {e}") from e

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise StagingNotFound(key) from None
        except OSError as e:
            raise StagingError(f"staging read failed: {e}") from e

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            if path.is_dir():
                failures: list[BaseException] = []

                def failed(function, failed_path, exc_info) -> None:  # type: ignore[no-untyped-def]
                    if not isinstance(exc_info[1], FileNotFoundError):  # gone already: a concurrent delete
                        failures.append(exc_info[1])

                shutil.rmtree(path, onerror=failed)
                if failures:  # part of it is still there: the caller must not count it gone
                    raise failures[0]
                return True
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StagingError(f"staging delete failed: {e}") from e

    def scan(self, prefix: str, depth: int) -> Iterator[tuple[str, float]]:
        now = time.time()
        base = self._path(prefix)
        pattern = "/".join(["*"] * depth)
        # Temporary files are entries too: one left by a process killed between writing and renaming
        # it is swept by age like the rest (a put holds its temporary file for milliseconds).
        for path in base.glob(pattern):
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue  # deleted under us by another sweeper
            yield str(path.relative_to(self.root)), age

    def check(self) -> None:
        """Raise StagingError unless the store can be written and read back now."""
        key = f"{PROBE_PREFIX}/{os.getpid()}-{threading.get_ident()}"  # concurrent checks must not delete each other's
        try:
            self.put(key, b"ok")
            if self.get(key) != b"ok":
                raise StagingError("staging read-back mismatch")
        finally:
            self.delete(key)  # also after a failed check: probe files must not pile up


def store_from_url(url: str) -> DirectoryStore:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return DirectoryStore(Path(parsed.path))
    raise ValueError(f"STAGING_URL scheme {parsed.scheme!r} is not supported (use file:///path)")


@lru_cache(maxsize=None)
def _store_for(url: str) -> DirectoryStore:
    return store_from_url(url)


def staging_store() -> DirectoryStore:
    """The process's store, as configured by STAGING_URL."""
    from django.conf import settings

    return _store_for(settings.STAGING_URL)
