"""The management REST API (`/v1/admin/...`): customers and keys for automation.

Callers are staff (Basic or session auth) or an API key with the `admin` scope. Every write goes
through identity.services, so it is audited and reaches the data plane through the change feed.
"""
from __future__ import annotations

import re
import uuid
from typing import Any

from django.conf import settings
from django.db.models import ProtectedError, Q
from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import authentication, exceptions, serializers
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.views import APIView

from controlplane.errors import ApiError
from controlplane.parsing import single_values
from identity import services
from identity.authentication import ApiKeyAuthentication, StaffBasicAuthentication
from identity.dataplane import Principal
from identity.models import SCOPES, ApiKey, AuditEvent, Customer, Plan


class _JsonBody(JSONParser):
    """DRF's JSON parser, with a body nested past Python's recursion limit refused as malformed: 2 KB
    of `[` raised RecursionError, a 500 on every management write (found by review)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError as e:
            raise exceptions.ParseError("JSON parse error - the body is nested too deeply.") from e


def _actor(request: Request) -> str:
    user = request.user
    if isinstance(user, Principal):
        return f"key:{user.key_prefix}"
    return f"staff:{user.get_username()}"


def _customer_json(customer: Customer) -> dict[str, Any]:
    return {"id": str(customer.id), "name": customer.name, "status": customer.status,
            "plan": customer.plan.name if customer.plan else None, "created_at": customer.created_at.isoformat()}


def _key_json(key: ApiKey) -> dict[str, Any]:
    return {"id": str(key.id), "customer_id": str(key.customer_id), "name": key.name, "prefix": key.prefix,
            "scopes": key.scopes, "created_at": key.created_at.isoformat(),
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
            "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None}


def _valid(serializer: serializers.Serializer) -> dict[str, Any]:
    """The body's fields, validated; 400 with the first field's first problem in a sentence. A field the
    endpoint does not take is refused (`{"stauts": "suspended"}` answered 200 and changed nothing)."""
    given = serializer.initial_data
    if not isinstance(given, dict):
        raise ApiError(400, "malformed_request", "The body must be a JSON object.")
    unknown = sorted(set(given) - set(serializer.fields))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"Unknown field {unknown[0]!r}; the fields are "
                       f"{', '.join(serializer.fields)}.", extra={"parameter": unknown[0]})
    if not serializer.is_valid():
        field, errors = next(iter(serializer.errors.items()))
        raise ApiError(400, "invalid_parameter", f"{field}: {_first_message(errors)}", extra={"parameter": field})
    return dict(serializer.validated_data)


CUSTOMERS_PAGE = 1000
AUDIT_PAGE = 200


def _cursor(request: Request, name: str) -> str | None:
    """The list's one query parameter (where the page starts), refusing any other: `?status=suspended`
    was ignored, and every customer came back."""
    query = single_values(request.query_params)
    unknown = sorted(set(query) - {name})
    if unknown:
        raise ApiError(400, "unknown_parameter", f"Unknown parameter {unknown[0]!r}; this list takes only "
                       f"{name!r} (where the page starts: the `next` of the previous page).",
                       extra={"parameter": unknown[0]})
    return query.get(name) or None


def _first_message(errors: Any) -> str:
    """A field's first error as a sentence: a list's errors are keyed by the item's position (the detail
    read "scopes: 0"), so that is named with it."""
    if isinstance(errors, dict):
        position, inner = next(iter(errors.items()))
        return f"item {position}: {_first_message(inner)}"
    if isinstance(errors, list) and errors:
        return _first_message(errors[0])
    return str(errors)


def _plan(name: str | None) -> Plan | None:
    if name is None:
        return None
    plan = Plan.objects.filter(name=name).first()
    if plan is None:
        raise ApiError(400, "unknown_plan", f"There is no plan named {name!r}.", extra={"parameter": "plan"})
    return plan


def _get_customer(customer_id: str) -> Customer:
    customer = Customer.objects.select_related("plan").filter(pk=_uuid(customer_id)).first()
    if customer is None:
        raise ApiError(404, "customer_not_found", f"There is no customer {customer_id}.")
    return customer


def _uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


class CustomerIn(serializers.Serializer):
    name = serializers.CharField(max_length=200, required=False)
    status = serializers.ChoiceField(choices=Customer.Status.values, required=False)
    plan = serializers.CharField(max_length=100, required=False, allow_null=True)


class KeyIn(serializers.Serializer):
    name = serializers.CharField(max_length=200, default="default")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=SCOPES), required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)


class CustomerOut(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    status = serializers.CharField()
    plan = serializers.CharField(allow_null=True)
    created_at = serializers.DateTimeField()


class KeyOut(serializers.Serializer):
    id = serializers.UUIDField()
    customer_id = serializers.UUIDField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    scopes = serializers.ListField(child=serializers.CharField())
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)
    last_used_at = serializers.DateTimeField(allow_null=True)
    key = serializers.CharField(required=False, help_text="the secret, only in the answer that issued it")


class AdminView(APIView):
    required_scope = "admin"
    authentication_classes = [ApiKeyAuthentication, StaffBasicAuthentication,
                              authentication.SessionAuthentication]
    parser_classes = [_JsonBody]


class CustomersView(AdminView):
    staff_permissions = {"GET": ("identity.view_customer",), "POST": ("identity.add_customer",)}

    @extend_schema(operation_id="admin_customers_list", parameters=[OpenApiParameter(
        "after", str, description="a customer id: the page after it (the `next` of the previous page)")],
        responses={200: inline_serializer("CustomerList", {
            "customers": CustomerOut(many=True),
            "next": serializers.CharField(allow_null=True, help_text="the next page's URL; null on the last page")})})
    def get(self, request: Request) -> HttpResponse:
        after = _cursor(request, "after")
        customers = Customer.objects.select_related("plan").order_by("created_at", "id")
        if after is not None:
            last = Customer.objects.filter(pk=_uuid(after)).first()
            if last is None:
                raise ApiError(400, "invalid_parameter", f"after: there is no customer {after}.",
                               extra={"parameter": "after"})
            customers = customers.filter(Q(created_at__gt=last.created_at) | Q(created_at=last.created_at, id__gt=last.id))
        page = list(customers[:CUSTOMERS_PAGE])
        # The list stopped at 1,000 without a word; a full page names the next one.
        more = f"/v1/admin/customers?after={page[-1].id}" if len(page) == CUSTOMERS_PAGE else None
        return JsonResponse({"customers": [_customer_json(c) for c in page], "next": more})

    @extend_schema(operation_id="admin_customers_create", request=CustomerIn, responses={201: CustomerOut})
    def post(self, request: Request) -> HttpResponse:
        data = _valid(CustomerIn(data=request.data))
        if not data.get("name"):
            raise ApiError(400, "invalid_parameter", "name: a customer needs a name.", extra={"parameter": "name"})
        customer = services.customer_create(name=data["name"], plan=_plan(data.get("plan")), actor=_actor(request))
        if data.get("status") == Customer.Status.SUSPENDED:
            services.customer_suspend(customer=customer, actor=_actor(request))
        return JsonResponse(_customer_json(customer), status=201)


class CustomerView(AdminView):
    staff_permissions = {"GET": ("identity.view_customer",), "PATCH": ("identity.change_customer",),
                         "DELETE": ("identity.delete_customer",)}

    @extend_schema(operation_id="admin_customer", responses={200: CustomerOut})
    def get(self, request: Request, customer_id: str) -> HttpResponse:
        return JsonResponse(_customer_json(_get_customer(customer_id)))

    @extend_schema(operation_id="admin_customer_update", request=CustomerIn, responses={200: CustomerOut})
    def patch(self, request: Request, customer_id: str) -> HttpResponse:
        customer = _get_customer(customer_id)
        data = _valid(CustomerIn(data=request.data, partial=True))
        plan: Plan | None | str = _plan(data["plan"]) if data.get("plan") is not None else (
            None if "plan" in data else "unchanged")
        services.customer_update(customer=customer, actor=_actor(request), name=data.get("name"),
                                 status=data.get("status"), plan=plan)
        return JsonResponse(_customer_json(customer))

    @extend_schema(operation_id="admin_customer_delete", responses={204: None})
    def delete(self, request: Request, customer_id: str) -> HttpResponse:
        try:
            services.customer_delete(customer=_get_customer(customer_id), actor=_actor(request))
        except services.CustomerRecentlyActive as e:
            minutes = settings.CUSTOMER_DELETE_QUIET_SECONDS // 60
            raise ApiError(409, "customer_recently_active", f"This customer used its API keys in the last {minutes} "
                           "minutes, and the usage of that work may not have reached billing yet; suspend it now "
                           "and delete it later.") from e
        except ProtectedError as e:
            # Invoices outlive customers (metering's billing periods protect them).
            raise ApiError(409, "customer_has_billing", "This customer has usage or billing records and cannot "
                           "be deleted; suspend it instead.") from e
        return HttpResponse(status=204)


class CustomerKeysView(AdminView):
    staff_permissions = {"GET": ("identity.view_apikey",), "POST": ("identity.add_apikey",)}

    @extend_schema(operation_id="admin_keys_list", responses={200: inline_serializer("KeyList", {"keys": KeyOut(many=True)})})
    def get(self, request: Request, customer_id: str) -> HttpResponse:
        keys = _get_customer(customer_id).api_keys.order_by("created_at")
        return JsonResponse({"keys": [_key_json(k) for k in keys]})

    @extend_schema(operation_id="admin_keys_issue", request=KeyIn, responses={201: KeyOut})
    def post(self, request: Request, customer_id: str) -> HttpResponse:
        customer = _get_customer(customer_id)
        data = _valid(KeyIn(data=request.data))
        if "admin" in (data.get("scopes") or ()) and not (isinstance(request.user, Principal)
                                                          or request.user.is_superuser):
            raise ApiError(403, "forbidden", "Only a superuser or a key with the admin scope may issue an admin key.")
        api_key, secret = services.api_key_create(customer=customer, name=data["name"], scopes=data.get("scopes"),
                                                  expires_at=data.get("expires_at"), actor=_actor(request))
        return JsonResponse({**_key_json(api_key), "key": secret}, status=201)


class KeyView(AdminView):
    staff_permissions = {"GET": ("identity.view_apikey",), "DELETE": ("identity.change_apikey",)}  # revoke

    def _key(self, key_id: str) -> ApiKey:
        key = ApiKey.objects.select_related("customer").filter(pk=_uuid(key_id)).first()
        if key is None:
            raise ApiError(404, "key_not_found", f"There is no API key {key_id}.")
        return key

    @extend_schema(operation_id="admin_key", responses={200: KeyOut})
    def get(self, request: Request, key_id: str) -> HttpResponse:
        return JsonResponse(_key_json(self._key(key_id)))

    @extend_schema(operation_id="admin_key_revoke", summary="Revoke a key", responses={200: KeyOut})
    def delete(self, request: Request, key_id: str) -> HttpResponse:
        return JsonResponse(_key_json(services.api_key_revoke(api_key=self._key(key_id), actor=_actor(request))))


class CustomerAuditView(AdminView):
    staff_permissions = {"GET": ("identity.view_auditevent",)}

    @extend_schema(operation_id="admin_customer_audit", parameters=[OpenApiParameter(
        "before", str, description="an event id: the older events after it (the `next` of the previous page)")],
        responses={200: inline_serializer("AuditEvents", {
            "events": serializers.ListField(child=serializers.DictField()),
            "next": serializers.CharField(allow_null=True, help_text="the next page's URL; null on the last page")})})
    def get(self, request: Request, customer_id: str) -> HttpResponse:
        before = _cursor(request, "before")
        customer = _get_customer(customer_id)
        events = AuditEvent.objects.filter(customer=customer).order_by("-at", "-id")
        if before is not None:
            last = AuditEvent.objects.filter(customer=customer, pk=int(before) if re.fullmatch(r"[0-9]{1,18}", before) else None).first()
            if last is None:
                raise ApiError(400, "invalid_parameter", f"before: this customer has no event {before}.",
                               extra={"parameter": "before"})
            events = events.filter(Q(at__lt=last.at) | Q(at=last.at, id__lt=last.id))
        page = list(events[:AUDIT_PAGE])
        more = (f"/v1/admin/customers/{customer.id}/audit?before={page[-1].id}" if len(page) == AUDIT_PAGE else None)
        return JsonResponse({"events": [{"id": e.id, "at": e.at.isoformat(), "actor": e.actor, "action": e.action,
                                         "details": e.details} for e in page], "next": more})
