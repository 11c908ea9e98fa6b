"""Cold storage for raw usage records: compressed files behind a three-method interface (put, get,
exists). A directory by default; an object store bucket would implement the same three."""
from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from metering.spool import fsync_dir


class ArchiveStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def exists(self, key: str) -> bool: ...


class DirectoryArchive:
    """Writes are atomic and fsynced (temp file, fsync, rename, fsync the directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad archive key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._make_directories(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)

    def _make_directories(self, directory: Path) -> None:
        """Create the file's directories, each made durable in its parent: the rows are deleted once
        the file reads back, and a crash must not take a fresh directory (and the file) with it."""
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for made in reversed(missing):
            made.mkdir(exist_ok=True)
            fsync_dir(made.parent)

    def get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).exists()


@lru_cache(maxsize=4)
def _store_for(url: str) -> ArchiveStore:
    parsed = urlparse(url)
    if parsed.scheme != "file":
        raise ValueError(f"METERING_ARCHIVE_URL={url!r}: only file:// archives are built in")
    return DirectoryArchive(Path(parsed.path))


def archive_store() -> ArchiveStore:
    from django.conf import settings

    return _store_for(settings.METERING_ARCHIVE_URL)
