"""Reads of identity: who is calling."""
from __future__ import annotations

from dataclasses import dataclass

from identity.keys import key_matches, key_prefix
from identity.models import ApiKey, Customer


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request: a customer acting through one of its keys."""

    customer_id: str
    key_id: str
    is_authenticated: bool = True


def principal_for_key(*, key: str) -> Principal | None:
    prefix = key_prefix(key)
    if prefix is None:
        return None
    api_key = (
        ApiKey.objects.select_related("customer")
        .filter(prefix=prefix, revoked_at__isnull=True, customer__status=Customer.Status.ACTIVE)
        .first()
    )
    if api_key is None or not key_matches(key, api_key.secret_hash):
        return None
    return Principal(customer_id=str(api_key.customer_id), key_id=str(api_key.id))
