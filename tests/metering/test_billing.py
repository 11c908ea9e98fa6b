"""Billing: graduated prices in integer micro-units, periods open -> grace -> finalized, late usage
as appended adjustments (once), and the report in admin, as CSV and as a management command."""
from __future__ import annotations

import csv
import io
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from django.core.management import call_command

from metering import pricing, services
from metering.models import Adjustment, BillingPeriod, CustomerPricePlan, PricePlan, PriceTier
from tests.metering.conftest import insert, usage

pytestmark = pytest.mark.django_db

START = datetime.now(timezone.utc).date().replace(day=1)
END = (START + timedelta(days=32)).replace(day=1)
AT = datetime(START.year, START.month, START.day, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("tiers,quantity,micros", [
    ([["3", 100], [None, 50]], Decimal(5), 3 * 100 + 2 * 50),
    ([["3", 100], [None, 50]], Decimal("2.5"), 250),
    ([["3", 100], ["10", 70], [None, 50]], Decimal(12), 300 + 7 * 70 + 2 * 50),
    ([["10", 7]], Decimal(12), 70),          # past the last bounded tier: free
    ([], Decimal(1000), 0),                  # an axis the plan does not charge
    ([[None, 1]], Decimal("0.0000005"), 0),  # half a micro rounds to even
    ([[None, 3]], Decimal("0.5"), 2),
])
def test_graduated_tiers_in_exact_micro_units(tiers, quantity, micros):
    assert pricing.amount_micros(tiers, quantity) == micros


@pytest.fixture
def tiny_plan(customer):
    plan = PricePlan.objects.create(name="tiny")
    PriceTier.objects.create(plan=plan, axis="images", up_to=3, unit_price_micros=1000)
    PriceTier.objects.create(plan=plan, axis="images", up_to=None, unit_price_micros=500)
    PriceTier.objects.create(plan=plan, axis="cpu_seconds", up_to=None, unit_price_micros=2000)
    CustomerPricePlan.objects.create(customer=customer, plan=plan, effective_from=START)
    return plan


def _report(customer) -> list[list[str]]:
    out = io.StringIO()
    call_command("billing_report", period=f"{START:%Y-%m}", customer=str(customer.id), stdout=out)
    return list(csv.reader(io.StringIO(out.getvalue())))


def test_a_period_goes_open_grace_finalized_and_late_usage_is_appended(customer, tiny_plan, standard_plan):
    insert(*[usage(customer.id, at=AT + timedelta(minutes=i)) for i in range(5)])
    services.usage_rollup()
    assert services.billing_run(today=START)["opened"] == 1
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert (period.status, period.end) == ("open", END)
    assert _report(customer)[1][7] == "provisional"

    services.billing_run(today=END)
    period.refresh_from_db()
    assert period.status == "grace"
    insert(usage(customer.id, at=AT))  # arrives during grace: still on the invoice
    services.usage_rollup()
    services.billing_run(today=END + timedelta(days=1))
    period.refresh_from_db()
    assert period.status == "grace"

    assert services.billing_run(today=END + timedelta(days=3))["finalized"] == 1
    period.refresh_from_db()
    lines = {line.axis: (line.quantity, line.amount_micros) for line in period.lines.all()}
    assert period.status == "finalized" and period.plan == tiny_plan
    assert lines["images"] == (6, 3 * 1000 + 3 * 500)
    assert lines["cpu_seconds"] == (Decimal("0.042"), 84)
    assert lines["input_mb"] == (Decimal("1.5"), 0)  # tiny charges nothing for input

    assert services.billing_run(today=END + timedelta(days=4)) == {"opened": 0, "grace": 0, "finalized": 0,
                                                                   "adjusted": 0}
    # Usage that reached the finalized period late: an adjustment, never an edit; once.
    insert(usage(customer.id, at=AT + timedelta(days=3)))
    services.usage_rollup()
    services.billing_run(today=END + timedelta(days=5))
    services.usage_rollup()
    services.billing_run(today=END + timedelta(days=6))
    assert {line.axis: (line.quantity, line.amount_micros) for line in period.lines.all()} == lines
    late = {a.axis: (a.quantity, a.amount_micros) for a in period.adjustments.all()}
    assert late["images"] == (1, 500) and late["cpu_seconds"] == (Decimal("0.007"), 14)
    assert period.adjustments.count() == 4 and all(a.kind == "late_usage" for a in period.adjustments.all())

    rows = _report(customer)
    assert rows[0][0] == "customer_id" and rows[-1][7] == "total"
    assert rows[-1][11] == pricing.money(4500 + 84 + 500 + 14)


def test_the_default_plan_prices_a_customer_without_one(customer, standard_plan):
    insert(*[usage(customer.id, at=AT) for _ in range(3)])
    services.usage_rollup()
    services.billing_run(today=END + timedelta(days=30))
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert period.plan == standard_plan and period.price_snapshot["plan"] == "standard"
    assert period.lines.get(axis="images").amount_micros == 3 * 500


def test_operators_append_adjustments_to_finalized_periods_only(customer, standard_plan, admin_client):
    insert(usage(customer.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=START)
    period = BillingPeriod.objects.get(customer=customer, start=START)
    with pytest.raises(ValueError):
        services.adjustment_create(period=period, amount_micros=-100, reason="goodwill", by="staff:ann")
    services.billing_run(today=END + timedelta(days=30))
    period.refresh_from_db()
    credit = services.adjustment_create(period=period, amount_micros=-100, reason="goodwill", by="staff:ann")
    assert credit.kind == Adjustment.Kind.MANUAL
    assert _report(customer)[-1][11] == pricing.money(period.lines.get(axis="images").amount_micros
                                                     + sum(line.amount_micros for line in period.lines.exclude(axis="images"))
                                                     - 100)

    # The same report in Django admin, and as CSV from there.
    assert admin_client.get("/admin/metering/billingperiod/").status_code == 200
    page = admin_client.get(f"/admin/metering/billingperiod/{period.pk}/change/")
    assert page.status_code == 200 and b"goodwill" in page.content
    exported = admin_client.get(f"/admin/metering/billingperiod/{period.pk}/csv/")
    assert exported.status_code == 200 and exported["Content-Type"] == "text/csv"
    rows = list(csv.reader(io.StringIO(exported.content.decode())))
    assert rows == _report(customer)
    action = admin_client.post("/admin/metering/billingperiod/", {"action": "export_csv", "_selected_action": [period.pk]})
    assert action.status_code == 200 and action.content.decode().splitlines()[0].startswith("customer_id,")


def test_a_plan_assignment_counts_from_its_date(customer, tiny_plan, standard_plan):
    next_start = END
    CustomerPricePlan.objects.create(customer=customer, plan=standard_plan, effective_from=next_start)
    from metering.selectors import price_plan_for

    assert price_plan_for(customer_id=customer.id, on=START)[0] == tiny_plan
    assert price_plan_for(customer_id=customer.id, on=next_start)[0] == standard_plan
    assert price_plan_for(customer_id=customer.id, on=date(2000, 1, 1))[0] == standard_plan


def test_a_report_for_an_unknown_customer_is_an_error_not_an_empty_report(customer):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no customer"):
        call_command("billing_report", period=f"{START:%Y-%m}", customer="nobody-by-this-name", stdout=io.StringIO())
    assert len(_report(customer)) == 1  # a real customer without a bill this month: the header alone


def test_a_new_default_plan_does_not_reprice_periods_already_open(customer, standard_plan, admin_client):
    """The default plan had no history: a period was priced with whatever plan was the default when
    it was finalized, so moving the default on the 2nd repriced last month's invoices."""
    insert(*[usage(customer.id, at=AT) for _ in range(3)])
    services.usage_rollup()
    services.billing_run(today=START)
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert period.plan == standard_plan  # the plan it opened with
    # A new default, made in admin in one save: the old one is unticked with it, no moment without one.
    added = admin_client.post("/admin/metering/priceplan/add/", {
        "name": "v2", "currency": "USD", "is_default": "on",
        "tiers-TOTAL_FORMS": "1", "tiers-INITIAL_FORMS": "0", "tiers-MIN_NUM_FORMS": "0", "tiers-MAX_NUM_FORMS": "1000",
        "tiers-0-axis": "images", "tiers-0-up_to": "", "tiers-0-unit_price_micros": "900"})
    assert added.status_code == 302, added.content[:500]
    assert list(PricePlan.objects.filter(is_default=True).values_list("name", flat=True)) == ["v2"]
    services.billing_run(today=END + timedelta(days=30))
    period.refresh_from_db()
    assert period.price_snapshot["plan"] == "standard"
    assert period.lines.get(axis="images").amount_micros == 3 * 500


def test_the_default_plan_cannot_be_unticked_and_a_plan_in_use_has_frozen_tiers(customer, standard_plan,
                                                                                admin_client):
    from django.contrib import admin as django_admin
    from django.contrib.auth.models import User

    from metering.admin import PriceTierInline

    unticked = admin_client.post(f"/admin/metering/priceplan/{standard_plan.pk}/change/", {
        "name": "standard", "currency": "USD",
        "tiers-TOTAL_FORMS": "0", "tiers-INITIAL_FORMS": "0", "tiers-MIN_NUM_FORMS": "0", "tiers-MAX_NUM_FORMS": "1000"})
    assert unticked.status_code == 200 and b"tick another plan" in unticked.content
    assert PricePlan.objects.get(pk=standard_plan.pk).is_default
    fresh = PricePlan.objects.create(name="draft")
    inline = PriceTierInline(PricePlan, django_admin.site)
    request = type("Request", (), {"user": User.objects.get(username="admin")})()
    assert inline.has_change_permission(request, fresh)  # not in use yet: its prices can still change
    insert(usage(customer.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=START)  # opens a period with the default plan
    assert not inline.has_change_permission(request, standard_plan)
    assert not inline.has_add_permission(request, standard_plan)
    assert not inline.has_delete_permission(request, standard_plan)


def test_a_billing_period_page_is_read_only(customer, standard_plan, admin_client):
    """Saving a period's page wrote back the row as read: one read before a billing run finalized it
    un-finalized it, and every later run failed on its existing invoice lines."""
    insert(usage(customer.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=END + timedelta(days=30))
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert period.status == "finalized"
    saved = admin_client.post(f"/admin/metering/billingperiod/{period.pk}/change/", {"_save": "Save"})
    assert saved.status_code == 403
    period.refresh_from_db()
    assert period.status == "finalized" and period.price_snapshot


def test_the_csv_export_needs_view_permission_and_an_unknown_period_is_404(customer, standard_plan, client,
                                                                           admin_client):
    from django.contrib.auth.models import User

    insert(usage(customer.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=START)
    period = BillingPeriod.objects.get(customer=customer, start=START)
    client.force_login(User.objects.create_user("clerk", password="pw", is_staff=True))
    assert client.get(f"/admin/metering/billingperiod/{period.pk}/csv/").status_code == 403
    assert admin_client.get("/admin/metering/billingperiod/999999999/csv/").status_code == 404


def test_a_customer_with_usage_but_no_period_yet_cannot_be_deleted(customer, standard_plan, admin_client):
    """Usage has no foreign key to its customer: a customer deleted before billing opened its first
    period had that usage dropped from billing, silently (billing joins the customer)."""
    from django.db.models import ProtectedError

    from identity.models import Customer
    from identity.services import customer_delete

    insert(usage(customer.id, at=AT))
    with pytest.raises(ProtectedError):
        customer_delete(customer=customer, actor="t")
    page = admin_client.post(f"/admin/identity/customer/{customer.pk}/delete/", {"post": "yes"})
    assert page.status_code == 200 and b"usage recorded" in page.content
    assert Customer.objects.filter(pk=customer.pk).exists()


def test_a_report_for_a_name_several_customers_share_is_an_error(customer):
    from django.core.management.base import CommandError

    from identity.services import customer_create

    customer_create(name="Acme")
    customer_create(name="Acme")
    with pytest.raises(CommandError, match="2 customers are named 'Acme'"):
        call_command("billing_report", period=f"{START:%Y-%m}", customer="Acme", stdout=io.StringIO())


def test_a_period_whose_assignment_was_removed_is_priced_with_the_default(customer, standard_plan):
    """A period opened while an assignment was in force must not keep that plan once the assignment
    is deleted (a mistaken assignment, undone before the month was billed)."""
    tiny = PricePlan.objects.create(name="mistake")
    PriceTier.objects.create(plan=tiny, axis="images", up_to=None, unit_price_micros=1)
    assignment = CustomerPricePlan.objects.create(customer=customer, plan=tiny, effective_from=START)
    insert(*[usage(customer.id, at=AT) for _ in range(3)])
    services.usage_rollup()
    services.billing_run(today=START)
    assignment.delete()
    services.billing_run(today=END + timedelta(days=30))
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert period.price_snapshot["plan"] == "standard"
    assert period.lines.get(axis="images").amount_micros == 3 * 500


def test_usage_of_a_deleted_customer_is_reported_not_dropped_in_silence(caplog):
    """A record still in a spool when its customer was deleted ships and rolls up later: billing can
    open no period for it (no customer), and said nothing."""
    import uuid as uuid_module

    gone = uuid_module.uuid4()
    services.usage_rollup()
    services.billing_run(today=START)  # what other tests left behind is reported here, not below
    insert(usage(gone, at=AT))
    services.usage_rollup()
    with caplog.at_level("WARNING", logger="metering.services"):
        services.billing_run(today=START)
    assert any(str(gone) in r.getMessage() and "not billed" in r.getMessage() for r in caplog.records)


def test_the_default_plan_cannot_be_deleted_in_admin_or_anywhere(standard_plan, admin_client):
    """Deleting the default before any period used it was allowed (PROTECT guards only plans in use):
    periods then opened with no plan, and finalizing them failed every billing run."""
    from django.db.models import ProtectedError

    page = admin_client.post(f"/admin/metering/priceplan/{standard_plan.pk}/delete/", {"post": "yes"})
    assert page.status_code == 403
    bulk = admin_client.post("/admin/metering/priceplan/", {"action": "delete_selected", "post": "yes",
                                                            "_selected_action": [standard_plan.pk]})
    assert bulk.status_code == 403  # perms_needed: the default is among them
    assert PricePlan.objects.filter(pk=standard_plan.pk, is_default=True).exists()
    with pytest.raises(ProtectedError):
        standard_plan.delete()
    with pytest.raises(ProtectedError):
        PricePlan.objects.filter(pk=standard_plan.pk).delete()
    assert PricePlan.objects.filter(pk=standard_plan.pk).exists()
    draft = PricePlan.objects.create(name="draft")  # any other plan not in use still goes
    assert admin_client.post(f"/admin/metering/priceplan/{draft.pk}/delete/", {"post": "yes"}).status_code == 302
    assert not PricePlan.objects.filter(pk=draft.pk).exists()


def test_one_period_that_cannot_be_priced_does_not_stop_the_others(customer, tiny_plan, standard_plan, caplog):
    """All due periods were finalized in one transaction: one raising NoPricePlan (opened while no plan
    was the default) rolled back every customer's invoice, every run."""
    from identity.services import customer_create

    unpriced = customer_create(name="no-plan")
    PricePlan.objects.filter(pk=standard_plan.pk).update(is_default=False)  # as if the default were gone
    insert(usage(customer.id, at=AT), usage(unpriced.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=START)
    assert BillingPeriod.objects.get(customer=unpriced).plan is None
    result = services.billing_run(today=END + timedelta(days=30))
    assert (result["finalized"], result["not_finalized"]) == (1, 1)
    assert BillingPeriod.objects.get(customer=customer).status == "finalized"
    stuck = BillingPeriod.objects.get(customer=unpriced)
    assert stuck.status == "grace" and not stuck.lines.exists()
    assert "not finalized" in caplog.text and "NoPricePlan" in caplog.text
    # Once a plan can price it, the next run finalizes it.
    PricePlan.objects.filter(pk=standard_plan.pk).update(is_default=True)
    assert services.billing_run(today=END + timedelta(days=31))["finalized"] == 1
    assert BillingPeriod.objects.get(customer=unpriced).status == "finalized"


def test_a_plan_in_use_has_a_frozen_currency(customer, standard_plan, admin_client):
    """Tiers froze once a plan was in use, its currency did not: an edit re-denominated the amounts
    of every period the plan prices."""
    form = {"name": "standard", "currency": "EUR", "is_default": "on", "tiers-TOTAL_FORMS": "0",
            "tiers-INITIAL_FORMS": "0", "tiers-MIN_NUM_FORMS": "0", "tiers-MAX_NUM_FORMS": "1000"}
    draft = PricePlan.objects.create(name="draft")  # not in use: its currency can still change
    saved = admin_client.post(f"/admin/metering/priceplan/{draft.pk}/change/", {**form, "name": "draft", "is_default": ""})
    assert saved.status_code == 302 and PricePlan.objects.get(pk=draft.pk).currency == "EUR"
    insert(usage(customer.id, at=AT))
    services.usage_rollup()
    services.billing_run(today=START)  # opens a period with the default plan
    page = admin_client.get(f"/admin/metering/priceplan/{standard_plan.pk}/change/")
    assert page.status_code == 200 and b'name="currency"' not in page.content
    admin_client.post(f"/admin/metering/priceplan/{standard_plan.pk}/change/", form)
    assert PricePlan.objects.get(pk=standard_plan.pk).currency == "USD"


def test_the_report_quotes_text_a_spreadsheet_would_run_as_a_formula(customer, tiny_plan, standard_plan,
                                                                     admin_client):
    """Customer names are chosen by whoever creates them: `=HYPERLINK(...)` went into the CSV as it
    was, and a spreadsheet opening the report ran it (found by the security review; the admin's
    download too, found by the diff review)."""
    customer.name = '=HYPERLINK("http://attacker.example","invoice")'
    customer.save()
    insert(*[usage(customer.id, at=AT + timedelta(minutes=i)) for i in range(2)])
    services.usage_rollup()
    services.billing_run(today=START)
    period = BillingPeriod.objects.get(customer=customer, start=START)
    exported = admin_client.get(f"/admin/metering/billingperiod/{period.pk}/csv/")
    assert exported.status_code == 200
    for rows in (_report(customer)[1:], list(csv.reader(io.StringIO(exported.content.decode())))[1:]):
        assert rows and all(row[1] == "'" + customer.name for row in rows)
        assert all(not cell.startswith(("=", "+", "@")) for row in rows for cell in row)


def test_billing_rolls_up_what_was_received_before_it_finalizes(customer, tiny_plan, standard_plan):
    """After beat was away, the overdue billing run can come before the rollup: it must not finalize a
    period from rollups that lack records already received (their usage then came as "late usage"
    adjustments, an invoice line short)."""
    insert(*[usage(customer.id, at=AT + timedelta(minutes=i)) for i in range(3)])
    services.usage_rollup()
    services.billing_run(today=END)  # open, then grace
    insert(*[usage(customer.id, at=AT + timedelta(hours=1, minutes=i)) for i in range(2)])  # after the rollup ran
    assert services.billing_run(today=END + timedelta(days=3))["finalized"] == 1
    period = BillingPeriod.objects.get(customer=customer, start=START)
    assert {line.axis: line.quantity for line in period.lines.all()}["images"] == 5
    assert not period.adjustments.exists()
