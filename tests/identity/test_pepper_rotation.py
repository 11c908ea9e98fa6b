"""What docs/OPERATIONS.md says of rotating the secrets: a key's stored hash is keyed by the one
API_KEY_PEPPER (no second pepper is tried), so a new pepper refuses every key issued before it;
SECRET_KEY alone does not touch the keys while the pepper is set on its own."""
from __future__ import annotations

from identity.keys import key_generate, key_hash, key_matches


def test_a_new_pepper_refuses_every_key_issued_before(settings):
    settings.API_KEY_PEPPER = "the-old-pepper"
    _, key = key_generate()
    stored = key_hash(key)
    assert key_matches(key, stored)
    settings.API_KEY_PEPPER = "the-new-pepper"
    assert not key_matches(key, stored)
    settings.SECRET_KEY = "the-old-pepper"  # no fallback to another secret either
    assert not key_matches(key, stored)


def test_a_new_secret_key_leaves_the_keys_alone_while_the_pepper_is_its_own(settings):
    settings.API_KEY_PEPPER, settings.SECRET_KEY = "the-pepper", "the-old-secret-key"
    _, key = key_generate()
    stored = key_hash(key)
    settings.SECRET_KEY = "the-new-secret-key"
    assert key_matches(key, stored)
