"""Every write of the management plane. Each one appends to the change feed (which the data plane
follows) and to the audit trail, in the same transaction, so neither can be forgotten."""
from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import ProtectedError
from django.http import Http404
from django.utils import timezone

from identity.keys import key_generate, key_hash
from identity.models import DEFAULT_SCOPES, SCOPES, ApiKey, AuditEvent, Change, Customer, Plan


class CustomerGone(Http404):
    """The customer was deleted by a write that committed first (answered as 404)."""


def _lock(customer_id: Any) -> None:
    """Serialize the writes of one customer by taking its row first: a delete racing an update or a
    key issue would otherwise leave an audit event pointing at a deleted customer, and its commit
    would fail on the foreign key (a 500 that schemathesis found). The later writer waits, then finds
    the customer gone."""
    if not list(Customer.objects.select_for_update().filter(pk=customer_id).values_list("pk", flat=True)):
        raise CustomerGone(f"There is no customer {customer_id}.")


def _record(*, actor: str, action: str, customer: Customer | None, details: dict[str, Any]) -> None:
    AuditEvent.objects.create(actor=actor, action=action, customer=customer, details=details)
    if customer is not None:
        Change.objects.create(customer_id=customer.id)


@transaction.atomic
def plan_save(*, plan: Plan, actor: str) -> Plan:
    """Create or change a plan. Its limits are part of every credential of its customers: each one
    gets a change-feed row, so the data plane applies new limits within its propagation bound (not
    at its next full resync, minutes later)."""
    created = plan.pk is None
    plan.save()
    with connection.cursor() as cursor:  # one statement, however many customers (one row each)
        cursor.execute(f"INSERT INTO {Change._meta.db_table} (customer_id)"
                       f" SELECT id FROM {Customer._meta.db_table} WHERE plan_id = %s", [plan.pk])
    AuditEvent.objects.create(actor=actor, action="plan.create" if created else "plan.update", customer=None,
                              details=_plan_details(plan))
    return plan


@transaction.atomic
def plan_delete(*, plan: Plan, actor: str) -> None:
    """Delete a plan no customer is on (the foreign key protects the others: ProtectedError)."""
    details = _plan_details(plan)
    plan.delete()
    AuditEvent.objects.create(actor=actor, action="plan.delete", customer=None, details=details)


def _plan_details(plan: Plan) -> dict[str, Any]:
    return {"plan": plan.name, "rate_per_second": plan.rate_per_second, "burst": plan.burst,
            "monthly_quota": plan.monthly_quota}


@transaction.atomic
def customer_create(*, name: str, plan: Plan | None = None, actor: str = "system") -> Customer:
    customer = Customer.objects.create(name=name, plan=plan)
    _record(actor=actor, action="customer.create", customer=customer,
            details={"name": name, "plan": plan.name if plan else None})
    return customer


@transaction.atomic
def customer_update(*, customer: Customer, actor: str, name: str | None = None, status: str | None = None,
                    plan: Plan | None | str = "unchanged") -> Customer:
    _lock(customer.pk)
    # Compare with the row as it is now, not as the caller read it before the lock: a suspension that
    # committed meanwhile must not be written back to "active" by a concurrent rename.
    customer.refresh_from_db(fields=["name", "status", "plan"])
    changes: dict[str, Any] = {}
    if name is not None and name != customer.name:
        changes["name"] = [customer.name, name]
        customer.name = name
    if status is not None and status != customer.status:
        if status not in Customer.Status.values:
            raise ValueError(f"status must be one of {', '.join(Customer.Status.values)}")
        changes["status"] = [customer.status, status]
        customer.status = status
    if plan != "unchanged" and plan != customer.plan:
        assert not isinstance(plan, str)
        changes["plan"] = [customer.plan.name if customer.plan else None, plan.name if plan else None]
        customer.plan = plan
    if changes:
        customer.save(update_fields=list(changes))
        action = "customer.update"
        if set(changes) == {"status"}:
            action = "customer.suspend" if status == Customer.Status.SUSPENDED else "customer.activate"
        _record(actor=actor, action=action, customer=customer, details=changes)
    return customer


def customer_suspend(*, customer: Customer, actor: str) -> Customer:
    return customer_update(customer=customer, actor=actor, status=Customer.Status.SUSPENDED)


def customer_activate(*, customer: Customer, actor: str) -> Customer:
    return customer_update(customer=customer, actor=actor, status=Customer.Status.ACTIVE)


class CustomerRecentlyActive(ProtectedError):
    """The customer used its keys within CUSTOMER_DELETE_QUIET_SECONDS: not deleted yet."""


def customer_recently_active(*, customer_id: Any) -> bool:
    """Whether a key of the customer was used within CUSTOMER_DELETE_QUIET_SECONDS (keys' last use
    reaches the database within about a second of a request: identity.dataplane's flush)."""
    from django.conf import settings

    since = timezone.now() - timedelta(seconds=settings.CUSTOMER_DELETE_QUIET_SECONDS)
    return ApiKey.objects.filter(customer_id=customer_id, last_used_at__gt=since).exists()


def customer_delete(*, customer: Customer, actor: str) -> None:
    """Delete a customer with no usage (raises ProtectedError otherwise: invoices outlive customers,
    and billing opens a period only for usage of a customer that still exists), and none on its way:
    one that used its keys within CUSTOMER_DELETE_QUIET_SECONDS raises CustomerRecentlyActive. Its
    last jobs' usage may still be in a worker's spool or in the queue; deleted before it shipped, the
    customer's work was served and never billed (found by review, 2026-11-23).

    A key's last use reaches the database by each API process's flush, every AUTH_POLL_SECONDS: a
    customer with keys is judged only after two of those have passed (a delete sent at once after a
    resize went through; found by the docs review). That wait, about 2.5 s, is outside the transaction."""
    from django.conf import settings

    if ApiKey.objects.filter(customer_id=customer.pk).exists():
        time.sleep(2 * settings.AUTH_POLL_SECONDS + 0.5)
    _customer_delete(customer=customer, actor=actor)


@transaction.atomic
def _customer_delete(*, customer: Customer, actor: str) -> None:
    from metering.selectors import customer_has_usage

    _lock(customer.pk)
    if customer_has_usage(customer_id=customer.pk):
        raise ProtectedError("the customer has usage recorded; suspend it instead", set())
    if customer_recently_active(customer_id=customer.pk):
        raise CustomerRecentlyActive("the customer used its API keys recently; its usage may not have reached "
                                     "billing yet: suspend it now and delete it later", set())
    # The customer's events lose their link when it goes (SET_NULL): this last one keeps who it was
    # and which keys it had, so the trail still answers for it.
    keys = [{"key_id": str(k.id), "prefix": k.prefix, "revoked": k.revoked_at is not None}
            for k in ApiKey.objects.filter(customer_id=customer.pk).order_by("created_at")]
    AuditEvent.objects.create(actor=actor, action="customer.delete", customer=customer,
                              details={"customer_id": str(customer.pk), "name": customer.name, "keys": keys})
    customer_id = customer.pk
    customer.delete()
    # The feed row goes last, as in every other write: its id is taken just before the commit, so
    # a slow cascade cannot leave it behind a higher id that readers have already passed.
    Change.objects.create(customer_id=customer_id)


@transaction.atomic
def api_key_create(*, customer: Customer, name: str = "default", scopes: list[str] | None = None,
                   expires_at: datetime | None = None, actor: str = "system") -> tuple[ApiKey, str]:
    """Issue a key; returns the row and the secret key, which exists only in this return value."""
    scopes = list(DEFAULT_SCOPES if scopes is None else scopes)
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    _lock(customer.pk)
    prefix, key = key_generate()
    api_key = ApiKey.objects.create(customer=customer, name=name, prefix=prefix, secret_hash=key_hash(key),
                                    scopes=scopes, expires_at=expires_at)
    _record(actor=actor, action="key.issue", customer=customer,
            details={"key_id": str(api_key.id), "prefix": prefix, "name": name, "scopes": scopes,
                     "expires_at": expires_at.isoformat() if expires_at else None})
    return api_key, key


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey, actor: str = "system") -> ApiKey:
    _lock(api_key.customer_id)
    api_key.refresh_from_db(fields=["revoked_at"])  # a revoke that committed meanwhile: nothing to do
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
        _record(actor=actor, action="key.revoke", customer=api_key.customer,
                details={"key_id": str(api_key.id), "prefix": api_key.prefix})
    return api_key


def api_keys_touch(*, last_used: dict[str, datetime]) -> None:
    """Record when keys were last used (batched by the data plane; not audited, not a change)."""
    for key_id, at in sorted(last_used.items()):  # one order in every process: no deadlock between flushes
        ApiKey.objects.filter(pk=key_id).exclude(last_used_at__gte=at).update(last_used_at=at)
