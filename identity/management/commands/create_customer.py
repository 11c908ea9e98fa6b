"""`manage.py create_customer NAME`: create a customer and print a new API key as the last line."""
from __future__ import annotations

import os
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from identity.keys import key_matches, key_prefix
from identity.models import ApiKey, Customer
from identity.services import api_key_create, customer_create


class Command(BaseCommand):
    help = "Create a customer and print a new API key (shown once) as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--reuse", action="store_true",
                            help="issue a new key to an existing customer of that name instead of a new customer")
        parser.add_argument("--key-file", type=Path,
                            help="keep the key in this file (mode 0600) and print it again while it still works "
                                 "(not revoked or expired, its customer active) instead of issuing another")

    def handle(self, *args: object, name: str, reuse: bool, key_file: Path | None, **options: object) -> None:
        name = name.strip()
        limit = Customer._meta.get_field("name").max_length
        if not name or "\x00" in name or len(name) > limit:  # as the management API refuses them
            raise CommandError(f"a customer's name is 1 to {limit} characters, not blank and without NUL")
        customer = Customer.objects.filter(name=name).order_by("created_at").first() if reuse else None
        if customer is None:
            customer = customer_create(name=name, actor="command")
        kept = _kept_key(key_file, customer) if key_file else None
        if kept:
            self.stdout.write(f"customer {customer.id} ({customer.name}); its API key kept in {key_file}:")
            self.stdout.write(kept)
            return
        _, key = api_key_create(customer=customer, actor="command")
        if key_file:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = key_file.with_name(f".{key_file.name}.tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
            tmp.replace(key_file)
        self.stdout.write(f"customer {customer.id} ({customer.name}); a new API key (shown once):")
        self.stdout.write(key)


def _kept_key(path: Path, customer: Customer) -> str | None:
    """The key in `path` if it is one of `customer`'s that still authenticates, else None."""
    try:
        key = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    prefix = key_prefix(key)
    if prefix is None or customer.status != Customer.Status.ACTIVE:
        return None
    row = ApiKey.objects.filter(customer=customer, prefix=prefix, revoked_at__isnull=True).first()
    if row is None or not key_matches(key, row.secret_hash):
        return None
    if row.expires_at is not None and row.expires_at <= timezone.now():
        return None
    return key
