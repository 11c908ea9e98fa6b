"""`manage.py create_customer NAME`: create a customer and print a new API key as the last line."""
from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser

from identity.models import Customer
from identity.services import api_key_create, customer_create


class Command(BaseCommand):
    help = "Create a customer and print a new API key (shown once) as the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--reuse", action="store_true",
                            help="issue a new key to an existing customer of that name instead of a new customer")

    def handle(self, *args: object, name: str, reuse: bool, **options: object) -> None:
        customer = Customer.objects.filter(name=name).order_by("created_at").first() if reuse else None
        if customer is None:
            customer = customer_create(name=name, actor="command")
        _, key = api_key_create(customer=customer, actor="command")
        self.stdout.write(f"customer {customer.id} ({customer.name}); a new API key (shown once):")
        self.stdout.write(key)
