"""Writes of the management plane: customers and keys."""
from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from identity.keys import key_generate, key_hash
from identity.models import ApiKey, Customer


@transaction.atomic
def customer_create(*, name: str) -> Customer:
    return Customer.objects.create(name=name)


def api_key_create(*, customer: Customer, name: str = "default") -> tuple[ApiKey, str]:
    """Issue a key; returns the row and the secret key, which exists only in this return value."""
    prefix, key = key_generate()
    api_key = ApiKey.objects.create(customer=customer, name=name, prefix=prefix, secret_hash=key_hash(key))
    return api_key, key


def api_key_revoke(*, api_key: ApiKey) -> None:
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
