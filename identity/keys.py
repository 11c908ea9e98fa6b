"""The API key format and its hash: `rsz_<prefix>_<secret>`, stored as prefix + HMAC-SHA256(pepper, key)."""
from __future__ import annotations

import hashlib
import hmac
import secrets

from django.conf import settings

KEY_SCHEME = "rsz"
PREFIX_LENGTH = 12
_PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"


def key_generate() -> tuple[str, str]:
    """Return (prefix, full key). The full key is shown once and never stored."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    return prefix, f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(key: str) -> str | None:
    """The lookup prefix of a presented key, or None when it is not of our format."""
    scheme, _, rest = key.partition("_")
    prefix, sep, secret = rest.partition("_")
    if scheme != KEY_SCHEME or not sep or len(prefix) != PREFIX_LENGTH or len(secret) < 20:
        return None
    return prefix


def key_hash(key: str) -> str:
    return hmac.new(settings.API_KEY_PEPPER.encode(), key.encode(), hashlib.sha256).hexdigest()


def key_matches(key: str, stored_hash: str) -> bool:
    return hmac.compare_digest(key_hash(key), stored_hash)
