"""Django admin, the operators' tool. Writes go through identity.services (audited, propagated)."""
from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from identity import services
from identity.models import ApiKey, AuditEvent, Customer, Plan


def _actor(request: HttpRequest) -> str:
    return f"staff:{request.user.get_username()}"


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = ("name", "rate_per_second", "burst", "monthly_quota")

    def save_model(self, request: HttpRequest, obj: Plan, form: Any, change: bool) -> None:
        services.plan_save(plan=obj, actor=_actor(request))  # audited, and its customers' limits propagate

    def delete_model(self, request: HttpRequest, obj: Plan) -> None:
        services.plan_delete(plan=obj, actor=_actor(request))  # only a plan no customer is on (PROTECT)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Plan]) -> None:
        for plan in queryset:
            services.plan_delete(plan=plan, actor=_actor(request))


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    fields = ("name", "prefix", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # keys are issued by the "issue a new key" action: the secret is shown once


class AuditInline(admin.TabularInline):
    model = AuditEvent
    fields = ("at", "actor", "action", "details")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0
    verbose_name_plural = "audit trail (newest first)"


class CustomerForm(forms.ModelForm):
    """The form carries the values it was opened with (hidden), so `changed_data` names only what the
    operator changed, not a field someone else changed meanwhile (compared with the row at save time,
    the stale value would look like an edit and be written back)."""

    class Meta:
        model = Customer
        fields = ("name", "plan")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for name in ("name", "plan"):
            if name in self.fields:
                self.fields[name].show_hidden_initial = True


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    form = CustomerForm
    list_display = ("name", "status", "plan", "created_at")
    list_filter = ("status", "plan")
    search_fields = ("name", "id")
    readonly_fields = ("id", "status", "created_at", "recent_requests", "usage_this_month")
    fields = ("id", "name", "plan", "status", "created_at", "usage_this_month", "recent_requests")
    inlines = [ApiKeyInline, AuditInline]
    actions = ["suspend", "activate", "issue_key"]

    @admin.display(description="recent requests (from metering)")
    def recent_requests(self, obj: Customer) -> str:
        from metering.selectors import recent_requests

        rows = recent_requests(customer_id=obj.pk)
        if not rows:
            return "none recorded yet"
        return format_html(
            "<table><tr><th>finished</th><th>job</th><th>params</th><th>outcome</th><th>in</th><th>out</th>"
            "<th>cpu s</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", (
                (r.event_time.strftime("%Y-%m-%d %H:%M:%S"), r.id, r.params or "", r.outcome + (f" ({r.error_code})" if r.error_code else ""),
                 f"{r.input_format} {r.input_width}x{r.input_height} {r.input_bytes} B",
                 f"{r.output_format} {r.output_width}x{r.output_height} {r.output_bytes} B" if r.output_bytes else "-",
                 r.cpu_seconds) for r in rows)))

    @admin.display(description="usage this month (rolled up)")
    def usage_this_month(self, obj: Customer) -> str:
        from datetime import date, timedelta

        from metering.selectors import period_totals

        start = date.today().replace(day=1)
        totals = period_totals(customer_id=obj.pk, start=start, end=(start + timedelta(days=32)).replace(day=1))
        return ", ".join(f"{k}: {v}" for k, v in totals.items()) or "none"

    def save_model(self, request: HttpRequest, obj: Customer, form: Any, change: bool) -> None:
        if change:
            # Only what this form changed: a field the operator left alone must not write back the value
            # the form was opened with over a change made meanwhile (say a plan set through the API).
            changed = set(form.changed_data)
            fresh = Customer.objects.get(pk=obj.pk)
            services.customer_update(customer=fresh, actor=_actor(request),
                                     name=obj.name if "name" in changed else None,
                                     plan=obj.plan if "plan" in changed else "unchanged")
        else:
            created = services.customer_create(name=obj.name, plan=obj.plan, actor=_actor(request))
            obj.pk, obj.created_at = created.pk, created.created_at

    def delete_model(self, request: HttpRequest, obj: Customer) -> None:
        services.customer_delete(customer=obj, actor=_actor(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Customer]) -> None:
        for customer in queryset:
            services.customer_delete(customer=customer, actor=_actor(request))

    def has_issue_key_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("identity.add_apikey")

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        # A customer's keys go with it (audited by customer_delete), though keys themselves are never
        # deleted one by one (revoke instead): deleting the customer must not need that permission.
        from metering.selectors import customer_has_usage

        deleted, model_count, perms_needed, protected = super().get_deleted_objects(objs, request)
        perms_needed.discard(ApiKey._meta.verbose_name)
        # Usage has no foreign key to the customer (records outlive it), but it is billed: refuse as
        # Django refuses a protected object.
        protected += [f"usage recorded for {c} (suspend the customer instead)" for c in objs
                      if customer_has_usage(customer_id=c.pk)]
        protected += [f"{c} used its API keys in the last {settings.CUSTOMER_DELETE_QUIET_SECONDS // 60} minutes: "
                      "its usage may not have reached billing yet (suspend it now, delete it later)" for c in objs
                      if services.customer_recently_active(customer_id=c.pk)]
        return deleted, model_count, perms_needed, protected

    @admin.action(description="Suspend the selected customers", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet[Customer]) -> None:
        for customer in queryset:
            services.customer_suspend(customer=customer, actor=_actor(request))
        self.message_user(request, f"Suspended {queryset.count()} customer(s); in effect within seconds.")

    @admin.action(description="Activate the selected customers", permissions=["change"])
    def activate(self, request: HttpRequest, queryset: QuerySet[Customer]) -> None:
        for customer in queryset:
            services.customer_activate(customer=customer, actor=_actor(request))
        self.message_user(request, f"Activated {queryset.count()} customer(s).")

    @admin.action(description="Issue a new API key (the secret is shown once)", permissions=["issue_key"])
    def issue_key(self, request: HttpRequest, queryset: QuerySet[Customer]) -> HttpResponse:
        # The secrets go in this one answer, never in a flash message: those wait in a signed (not
        # encrypted) cookie or in the session table until shown.
        issued = [(customer.name, services.api_key_create(customer=customer, name="admin-issued",
                                                          actor=_actor(request))[1]) for customer in queryset]
        response = HttpResponse(format_html(
            "<!doctype html><title>New API keys</title><h1>New API keys</h1>"
            "<p>Copy them now: they are not shown again.</p><table>{}</table><p><a href=\"{}\">Back</a></p>",
            format_html_join("", "<tr><td>{}</td><td><code>{}</code></td></tr>", issued),
            reverse("admin:identity_customer_changelist")))
        response["Cache-Control"] = "no-store"
        return response


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("prefix", "customer", "name", "scopes", "created_at", "expires_at", "revoked_at", "last_used_at")
    list_filter = ("revoked_at",)
    search_fields = ("prefix", "customer__name")
    readonly_fields = ("id", "customer", "name", "prefix", "scopes", "created_at", "expires_at", "revoked_at",
                       "last_used_at")
    exclude = ("secret_hash",)
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Read-only pages: a Save would write the row as it was read, undoing a revoke committed meanwhile.
        return obj is None and super().has_change_permission(request)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # revoke instead: the audit trail keeps the key's history

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset.select_related("customer"):
            services.api_key_revoke(api_key=key, actor=_actor(request))
        self.message_user(request, f"Revoked {queryset.count()} key(s); in effect within seconds.")


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("at", "actor", "action", "customer")
    list_filter = ("action",)
    search_fields = ("actor", "customer__name")
    readonly_fields = ("at", "actor", "action", "customer", "details")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
