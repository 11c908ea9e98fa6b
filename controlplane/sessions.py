"""The admin's sessions: Django's database sessions, taking only a cookie that can be a session key."""
from __future__ import annotations

from django.contrib.sessions.backends.db import SessionStore as DatabaseSessionStore


class SessionStore(DatabaseSessionStore):
    """Django makes session keys of 32 lower-case letters and digits. Any other cookie value is no
    session, and is never looked up: a quoted cookie's octal escape (`sessionid="abcdefghij\\000"`)
    put a NUL into the lookup, which PostgreSQL refuses (DataError), and any anonymous client had a 500
    with a traceback on /admin/ and /v1/admin (found by the security review of 2026-11-23)."""

    def _validate_session_key(self, key: str | None) -> bool:
        return bool(super()._validate_session_key(key)) and key is not None and key.isascii() and key.isalnum()
