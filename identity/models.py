"""Customers and API keys. A key is stored as a public lookup prefix plus a peppered HMAC of the whole key."""
from __future__ import annotations

import uuid

from django.db import models


class Customer(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


class ApiKey(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=200, default="default")
    # Public, indexed: finds the row without revealing anything that authenticates.
    prefix = models.CharField(max_length=16, unique=True)
    # HMAC-SHA256(pepper, key), hex. A fast keyed hash, not a password hash: keys are long random
    # secrets (no dictionary to attack) and this runs on every request.
    secret_hash = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix} ({self.customer})"
