"""GET /v1/usage: a customer's own usage per hour or day, read from the rollups."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from django.http import HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request

from controlplane.errors import ApiError
from controlplane.parsing import refuse_unknown, single_values
from controlplane.views import CustomerView, problems, retry_after
from metering import selectors

STEP = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
# The widest range one request may ask for, per granularity.
MAX_RANGE = {"hour": timedelta(days=31), "day": timedelta(days=366)}
DEFAULT_RANGE = {"hour": timedelta(hours=24), "day": timedelta(days=30)}
_PARAMS = ("from", "to", "granularity")
_EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
_LATEST = datetime(9999, 1, 1, tzinfo=timezone.utc)


def _usage_numbers() -> dict[str, serializers.Field]:
    return {field: serializers.FloatField() if field.endswith(("megapixels", "seconds")) else serializers.IntegerField()
            for field in selectors.USAGE_FIELDS}


USAGE_SCHEMA = inline_serializer("Usage", {
    "granularity": serializers.ChoiceField(choices=list(STEP)),
    "from": serializers.DateTimeField(),
    "to": serializers.DateTimeField(),
    "as_of": serializers.DateTimeField(allow_null=True, help_text="the rollup covers records up to here"),
    "windows": inline_serializer("UsageWindow", {"start": serializers.DateTimeField(), **_usage_numbers()}, many=True),
    "totals": inline_serializer("UsageTotals", _usage_numbers()),
})


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _instant(name: str, raw: str) -> datetime:
    """An ISO 8601 date or date-time; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00")) if "T" in raw else None
        if value is None:
            day = date.fromisoformat(raw)
            value = datetime(day.year, day.month, day.day)
        value = (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):  # OverflowError: 0001-01-01T00:30+01:00 is before year 1 in UTC
        # An offset's `+` sent as it is arrives as a space (form encoding): 2026-11-01T13:00:00+01:00
        # was told only that it was no ISO 8601 date-time, which it looks like.
        plus = " (a `+` in a URL must be sent as %2B: it arrived as a space)" if " " in raw else ""
        raise ApiError(400, "invalid_parameter", f"`{name}` must be an ISO 8601 date or date-time, like "
                       f"2026-11-01 or 2026-11-01T13:00:00Z{plus}.", extra={"parameter": name}) from None
    if not _EARLIEST <= value <= _LATEST:  # the range arithmetic below stays inside datetime's years
        raise ApiError(400, "invalid_parameter", f"`{name}` must lie between 1970 and 9999.",
                       extra={"parameter": name})
    return value


def _floor(t: datetime, granularity: str) -> datetime:
    t = t.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    return t.replace(hour=0) if granularity == "day" else t


def _number(value: Any) -> int | float:
    return float(value) if isinstance(value, Decimal) else int(value or 0)


class UsageView(CustomerView):
    required_scope = "usage"

    @extend_schema(
        operation_id="usage",
        summary="Your usage per hour or day",
        description=(
            "Usage windows whose start lies in [from, to), `from` rounded down to the window. Billed "
            "axes count succeeded jobs; `failed_images` counts failures, which are free. Numbers come "
            "from the rollups: `as_of` says up to when records are included."
        ),
        parameters=[
            OpenApiParameter("from", str, description="ISO 8601 date or date-time (UTC if no offset); "
                             "default: `to` minus 24 hours (hour) or 30 days (day)"),
            OpenApiParameter("to", str, description="exclusive; default now"),
            OpenApiParameter("granularity", str, enum=list(STEP), description="default day"),
            retry_after(429, 503),
        ],
        responses={200: USAGE_SCHEMA, **problems(400, 401, 403, 429, 503)},
    )
    def get(self, request: Request) -> HttpResponse:
        query = single_values(request.query_params)  # a repeated one is refused, not read as its last
        refuse_unknown(query, _PARAMS, "use from, to and granularity")
        granularity = (query.get("granularity") or "day").lower()  # values' case is free, as on /v1/resize
        if granularity not in STEP:
            raise ApiError(400, "invalid_parameter", "`granularity` must be `hour` or `day`.",
                           extra={"parameter": "granularity"})
        end = _instant("to", query["to"]) if query.get("to") else datetime.now(timezone.utc)
        start = _instant("from", query["from"]) if query.get("from") else end - DEFAULT_RANGE[granularity]
        start = _floor(start, granularity)
        if start >= end:
            raise ApiError(400, "invalid_parameter", "`from` must be before `to`.", extra={"parameter": "from"})
        if end - start > MAX_RANGE[granularity]:
            raise ApiError(400, "range_too_large", f"At most {MAX_RANGE[granularity].days} days of "
                           f"{'hourly' if granularity == 'hour' else 'daily'} windows per request.", extra={"parameter": "from"})
        windows = selectors.usage_windows(customer_id=request.user.customer_id, granularity=granularity,
                                          start=start, end=end)
        totals = {field: sum(_number(w[field]) for w in windows) for field in selectors.USAGE_FIELDS}
        as_of = selectors.usage_as_of()
        response = JsonResponse({
            "granularity": granularity,
            "from": _iso(start),
            "to": _iso(end),
            "as_of": _iso(as_of) if as_of else None,
            "windows": [{"start": _iso(w["window_start"]), **{f: _number(w[f]) for f in selectors.USAGE_FIELDS}}
                        for w in windows],
            "totals": {f: round(v, 6) if isinstance(v, float) else v for f, v in totals.items()},
        })
        response["Cache-Control"] = "private, no-store"
        return response
