"""Concurrent management writes to one customer (what schemathesis's two workers did to
DELETE /v1/admin/customers/{id}): the later writer waits for the earlier one and then finds the
customer gone, a 404, instead of a foreign-key violation at commit (a 500) or a deleted customer
brought back by an update."""
from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction

from identity import services
from identity.models import ApiKey, AuditEvent, Customer

pytestmark = pytest.mark.django_db(transaction=True)


def _race(second) -> object:  # type: ignore[no-untyped-def]
    """Delete the customer in a transaction held open, run `second` meanwhile, then commit."""
    customer = services.customer_create(name="race")
    deleted, release = threading.Event(), threading.Event()

    def delete() -> None:
        try:
            with transaction.atomic():
                services.customer_delete(customer=Customer.objects.get(pk=customer.pk), actor="first")
                deleted.set()
                release.wait(10)
        finally:
            connection.close()

    outcome: dict[str, object] = {}

    def other() -> None:
        try:
            outcome["result"] = second(customer.pk)
        except Exception as e:
            outcome["error"] = e
        finally:
            connection.close()

    first = threading.Thread(target=delete)
    first.start()
    assert deleted.wait(10)
    racing = threading.Thread(target=other)
    racing.start()
    time.sleep(0.3)
    assert racing.is_alive()  # waiting for the customer's row
    release.set()
    first.join(10)
    racing.join(10)
    assert not Customer.objects.filter(pk=customer.pk).exists()
    return outcome.get("error", outcome.get("result"))


def test_an_update_racing_a_delete_finds_the_customer_gone():
    error = _race(lambda pk: services.customer_update(customer=Customer.objects.get(pk=pk), actor="second",
                                                      name="renamed"))
    assert isinstance(error, services.CustomerGone), error


def test_a_key_issued_racing_a_delete_finds_the_customer_gone():
    error = _race(lambda pk: services.api_key_create(customer=Customer.objects.get(pk=pk), actor="second"))
    assert isinstance(error, services.CustomerGone), error
    assert not ApiKey.objects.exists()


def test_two_deletes_racing_one_wins_the_other_finds_it_gone():
    error = _race(lambda pk: services.customer_delete(customer=Customer.objects.get(pk=pk), actor="second"))
    assert isinstance(error, services.CustomerGone), error


def test_a_rename_read_before_a_suspension_does_not_undo_it():
    """Two PATCHes at once, a suspension and a rename: the rename read the customer (active) before
    the suspension committed, then waited for the row. Writing its stale copy back re-activated the
    customer (and the change feed re-enabled its keys) while the audit trail said suspended."""
    customer = services.customer_create(name="before")
    read_by_the_rename = Customer.objects.get(pk=customer.pk)
    services.customer_suspend(customer=Customer.objects.get(pk=customer.pk), actor="first")
    services.customer_update(customer=read_by_the_rename, actor="second", name="after")
    now = Customer.objects.get(pk=customer.pk)
    assert (now.name, now.status) == ("after", Customer.Status.SUSPENDED)
    assert [(e.action, e.details) for e in AuditEvent.objects.filter(customer=customer).order_by("at")][1:] == [
        ("customer.suspend", {"status": ["active", "suspended"]}), ("customer.update", {"name": ["before", "after"]})]


def test_a_key_revoked_twice_is_revoked_and_audited_once():
    customer = services.customer_create(name="keys")
    api_key, _ = services.api_key_create(customer=customer)
    stale = ApiKey.objects.get(pk=api_key.pk)
    first = services.api_key_revoke(api_key=ApiKey.objects.get(pk=api_key.pk), actor="first")
    services.api_key_revoke(api_key=stale, actor="second")
    assert ApiKey.objects.get(pk=api_key.pk).revoked_at == first.revoked_at
    assert AuditEvent.objects.filter(action="key.revoke", customer=customer).count() == 1
