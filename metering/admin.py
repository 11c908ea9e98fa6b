"""Django admin for billing: price plans, plan assignments, and per-customer billing reports with a
CSV export. Invoice lines are read-only; corrections are appended as adjustments."""
from __future__ import annotations

import csv
from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from metering import pricing, selectors, services
from metering.models import Adjustment, ArchiveFile, BillingPeriod, CustomerPricePlan, InvoiceLine, PricePlan, PriceTier


def _plan_in_use(plan: PricePlan | None) -> bool:
    """A plan some period was opened or priced with, or some customer is assigned: its tiers price
    invoices being computed, so they are frozen (make a new plan to change prices)."""
    return plan is not None and plan.pk is not None and (
        BillingPeriod.objects.filter(plan=plan).exists() or CustomerPricePlan.objects.filter(plan=plan).exists())


class PriceTierInline(admin.TabularInline):
    model = PriceTier
    extra = 1

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not _plan_in_use(obj) and super().has_add_permission(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not _plan_in_use(obj) and super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return not _plan_in_use(obj) and super().has_delete_permission(request, obj)


class PricePlanForm(forms.ModelForm):
    class Meta:
        model = PricePlan
        fields = ("name", "currency", "is_default")
        help_texts = {"is_default": "the plan of customers with no assignment; ticking it here moves the default "
                                    "from the current default plan (periods already open keep theirs)"}

    def _get_validation_exclusions(self) -> set[str]:
        # one_default_plan is kept by save_model, which unticks the old default in the same transaction.
        return {*super()._get_validation_exclusions(), "is_default"}

    def clean_is_default(self) -> bool:
        is_default = self.cleaned_data["is_default"]
        if self.instance.pk is not None and self.instance.is_default and not is_default:
            raise forms.ValidationError("Some plan must be the default: tick another plan's default instead.")
        return is_default


@admin.register(PricePlan)
class PricePlanAdmin(admin.ModelAdmin):
    """Tiers are frozen once the plan is in use; the default moves in one save (no moment without one,
    when billing could not price a customer without an assignment)."""

    form = PricePlanForm
    list_display = ("name", "currency", "is_default")
    inlines = [PriceTierInline]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        # Its currency, like its tiers, prices invoices being computed: frozen once the plan is in use
        # (until 2026-11-22 it could be edited, re-denominating open periods' amounts).
        fields = super().get_readonly_fields(request, obj)
        return (*fields, "currency") if _plan_in_use(obj) else fields

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The default plan is never deleted (models.py refuses it too): billing opens every period with it.
        return not (obj is not None and obj.is_default) and super().has_delete_permission(request, obj)

    def save_model(self, request: HttpRequest, obj: PricePlan, form: Any, change: bool) -> None:
        if obj.is_default:  # inside the admin's transaction: the old default is unticked with this save
            PricePlan.objects.filter(is_default=True).exclude(pk=obj.pk).update(is_default=False)
        super().save_model(request, obj, form, change)


@admin.register(CustomerPricePlan)
class CustomerPricePlanAdmin(admin.ModelAdmin):
    list_display = ("customer", "plan", "effective_from")
    list_filter = ("plan",)
    search_fields = ("customer__name", "customer__id")
    autocomplete_fields = ("customer",)


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    fields = ("axis", "quantity", "amount")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="amount")
    def amount(self, line: InvoiceLine) -> str:
        return pricing.money(line.amount_micros)


class AdjustmentInline(admin.TabularInline):
    model = Adjustment
    fields = ("created_at", "kind", "axis", "quantity", "amount", "reason", "created_by")
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # appended through the "Append an adjustment" page, by metering.services

    @admin.display(description="amount")
    def amount(self, adjustment: Adjustment) -> str:
        return pricing.money(adjustment.amount_micros)


def _csv(periods: QuerySet[BillingPeriod], filename: str) -> HttpResponse:
    response = HttpResponse(content_type="text/csv")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    writer = csv.writer(response)
    writer.writerow(selectors.REPORT_HEADER)
    for period in periods.select_related("customer"):
        writer.writerows(map(selectors.spreadsheet_safe, selectors.billing_report_rows(period=period)))
    return response


@admin.register(BillingPeriod)
class BillingPeriodAdmin(admin.ModelAdmin):
    """The billing report: one customer's period with its lines and adjustments (or, before
    finalization, a provisional pricing of its usage so far)."""

    list_display = ("customer", "start", "end", "status", "plan", "total", "csv_link")
    list_filter = ("status", "start")
    search_fields = ("customer__name", "customer__id")
    date_hierarchy = "start"
    readonly_fields = ("customer", "start", "end", "status", "plan", "currency", "finalized_at", "reconciled_at",
                       "report")
    exclude = ("price_snapshot",)
    inlines = [InvoiceLineInline, AdjustmentInline]
    actions = ["export_csv"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # periods are opened by billing from usage

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Read-only (adjustments are appended on their own page): a Save wrote the period back as read,
        # and one read before a billing run finalized it un-finalized it, stopping every later run.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="total")
    def total(self, period: BillingPeriod) -> str:
        return list(selectors.billing_report_rows(period=period))[-1][-3]

    @admin.display(description="CSV")
    def csv_link(self, period: BillingPeriod) -> str:
        return format_html('<a href="{}">CSV</a>', reverse("admin:metering_billingperiod_csv", args=[period.pk]))

    @admin.display(description="report")
    def report(self, period: BillingPeriod) -> str:
        rows = list(selectors.billing_report_rows(period=period))
        body = format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                ((r[7], r[8], r[10], r[11], r[12]) for r in rows))
        return format_html('<table><tr><th>kind</th><th>axis</th><th>quantity</th><th>amount ({})</th>'
                           '<th>reason</th></tr>{}</table> <a href="{}">Download CSV</a>',
                           rows[-1][6], body,
                           reverse("admin:metering_billingperiod_csv", args=[period.pk]))

    def get_urls(self) -> list[Any]:
        return [
            path("<int:pk>/csv/", self.admin_site.admin_view(self.csv_view), name="metering_billingperiod_csv"),
            *super().get_urls(),
        ]

    def csv_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        if not self.has_view_permission(request):  # admin_view checks only that the user is staff
            raise PermissionDenied
        period = BillingPeriod.objects.filter(pk=pk)
        first = period.select_related("customer").first()
        if first is None:
            raise Http404(f"There is no billing period {pk}.")
        return _csv(period, f"billing-{first.customer_id}-{first.start:%Y-%m}.csv")

    @admin.action(description="Export the selected billing reports as CSV")
    def export_csv(self, request: HttpRequest, queryset: QuerySet[BillingPeriod]) -> HttpResponse:
        return _csv(queryset.order_by("customer__name", "start"), "billing-report.csv")


class AdjustmentForm(forms.ModelForm):
    class Meta:
        model = Adjustment
        fields = ("period", "amount_micros", "reason")
        help_texts = {"amount_micros": "millionths of the currency unit; a credit is negative"}

    def clean_period(self) -> BillingPeriod:
        period = self.cleaned_data["period"]
        if period.status != BillingPeriod.Status.FINALIZED:
            raise forms.ValidationError("Only a finalized period takes adjustments.")
        return period


@admin.register(Adjustment)
class AdjustmentAdmin(admin.ModelAdmin):
    """Append an operator's correction to a finalized period; existing adjustments are never edited."""

    list_display = ("period", "kind", "axis", "quantity", "amount_micros", "reason", "created_by", "created_at")
    list_filter = ("kind",)
    form = AdjustmentForm
    autocomplete_fields = ("period",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return obj is None

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Adjustment, form: Any, change: bool) -> None:
        created = services.adjustment_create(period=obj.period, amount_micros=obj.amount_micros,
                                             reason=obj.reason, by=f"staff:{request.user.get_username()}")
        obj.pk, obj.kind, obj.created_by, obj.created_at = created.pk, created.kind, created.created_by, created.created_at


@admin.register(ArchiveFile)
class ArchiveFileAdmin(admin.ModelAdmin):
    list_display = ("customer_id", "day", "records", "key", "created_at")
    search_fields = ("customer_id",)
    readonly_fields = ("customer_id", "day", "key", "records", "sha256", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
