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


def test_a_secret_key_rotation_keeps_what_the_old_key_signed_while_it_is_a_fallback():
    """SECRET_KEY_FALLBACKS is read from the environment: a session (anything signed) made with the old
    key verifies under the new one while the old is listed, and not once it is dropped."""
    import os
    import subprocess
    import sys

    from django.core import signing

    from tests.conftest import ROOT

    token = signing.dumps({"staff": 1}, key="the-old-secret-key")
    check = "import django; django.setup(); from django.core import signing; import sys; print(signing.loads(sys.argv[1]))"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "controlplane.settings", "SECRET_KEY": "the-new-secret-key"}
    kept = subprocess.run([sys.executable, "-c", check, token], cwd=ROOT, capture_output=True, text=True,
                          env={**env, "SECRET_KEY_FALLBACKS": "another-key, the-old-secret-key"})
    assert kept.returncode == 0 and kept.stdout.strip() == "{'staff': 1}", kept.stderr[-2000:]
    dropped = subprocess.run([sys.executable, "-c", check, token], cwd=ROOT, capture_output=True, text=True, env=env)
    assert dropped.returncode != 0 and "BadSignature" in dropped.stderr
