"""DRF glue for the data plane: Bearer-key authentication, scopes, per-customer rate limits and
monthly quotas, all answered from the process's credential cache (identity/dataplane.py)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions, throttling
from rest_framework.request import Request

from controlplane.errors import ApiError, problem
from identity.dataplane import AuthFailed, AuthUnavailable, Principal, QuotaUnconfirmed, credential_cache

if TYPE_CHECKING:  # DRF imports this module while rest_framework.views is still loading
    from rest_framework.views import APIView


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None  # -> NotAuthenticated (401) from the permission check
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer":
            return None  # perhaps Basic, for the staff-only management API
        if not key.strip():
            raise exceptions.AuthenticationFailed("Send the API key as `Authorization: Bearer <key>`.")
        try:
            return credential_cache().authenticate(key.strip()), None
        except AuthFailed as e:
            if e.code == "customer_suspended":
                raise ApiError(403, e.code, e.detail) from e
            raise exceptions.AuthenticationFailed(e.detail) from e
        except AuthUnavailable as e:
            raise ApiError(503, "auth_unavailable", "Credentials cannot be checked right now; retry shortly.",
                           headers={"Retry-After": "5"}) from e

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="resizer"'


class StaffBasicAuthentication(authentication.BasicAuthentication):
    """Basic auth for staff on the management API, with failed attempts capped per process: each
    check of a password (right or wrong, known user or not) costs a PBKDF2 of a million rounds,
    about a third of a CPU-second, so unthrottled wrong passwords were both a guessing oracle and a
    way to take the API tier's CPU. Past the cap, unverified Basic logins are refused with 429 for the
    rest of the minute, before any hashing. A password verified in the last VERIFIED_SECONDS passes
    without hashing (an HMAC under a key of this process, compared with the one it verified), so a
    script already logged in keeps working while someone floods the endpoint with wrong passwords, and
    pays one PBKDF2 a minute instead of one a request. Keys with the admin scope and the admin's
    session are not affected."""

    FAILURES_PER_MINUTE = 20
    VERIFIED_SECONDS = 60
    _failures: deque[float] = deque()
    # username -> (HMAC of the password, user pk, the user's stored password hash, until)
    _verified: dict[str, tuple[bytes, Any, str, float]] = {}
    _secret = os.urandom(32)
    _lock = threading.Lock()

    def authenticate_credentials(self, userid: str, password: str, request: Any = None) -> Any:
        from django.contrib.auth import get_user_model

        cls = StaffBasicAuthentication
        digest = hmac.new(cls._secret, password.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with cls._lock:
            verified = cls._verified.get(userid)
        if verified is not None and verified[3] > now and hmac.compare_digest(verified[0], digest):
            user = get_user_model().objects.filter(pk=verified[1], is_active=True).first()
            # The stored hash unchanged: a password changed (or reset) since takes effect at once.
            if user is not None and hmac.compare_digest(user.password, verified[2]):
                return user, None
        retry_after = cls.throttled()
        if retry_after is not None:
            raise ApiError(429, "login_throttled", "Too many failed logins on this server; use an API key "
                           "with the admin scope, or retry later.", headers={"Retry-After": str(retry_after)})
        try:
            user, auth = super().authenticate_credentials(userid, password, request)
        except exceptions.AuthenticationFailed:
            # The name's verified entry stays: a flood of wrong passwords for a script's own user name
            # must not log the script out (the entry matches only the password it verified).
            cls.failed()
            raise
        with cls._lock:
            if len(cls._verified) >= 1000:  # staff accounts are few; a flood of names must not grow it
                cls._verified.clear()
            cls._verified[userid] = (digest, user.pk, user.password, time.monotonic() + cls.VERIFIED_SECONDS)
        return user, auth

    @classmethod
    def throttled(cls) -> int | None:
        """Seconds until a password may be checked again on this process, or None: the cap counts the
        failures of Basic logins and of the admin's login form together (the same PBKDF2 each)."""
        now = time.monotonic()
        with cls._lock:
            while cls._failures and now - cls._failures[0] > 60:
                cls._failures.popleft()
            if len(cls._failures) >= cls.FAILURES_PER_MINUTE:
                return max(1, int(61 - (now - cls._failures[0])))
        return None

    @classmethod
    def failed(cls) -> None:
        with cls._lock:
            cls._failures.append(time.monotonic())


def admin_login_throttled(login: Any) -> Any:
    """Django admin's login view under the same cap of failed logins as Basic auth: the form checked
    every password it was sent (a million-round PBKDF2 each, a guessing oracle and a third of a
    CPU-second), and a session it opens also reaches the management API. Past the cap a POST is
    refused with 429 before any hashing; a failed login is the form answered again (200)."""

    @functools.wraps(login)
    def view(request: Any, extra_context: Any = None) -> Any:
        if request.method == "POST":
            retry_after = StaffBasicAuthentication.throttled()
            if retry_after is not None:
                return problem(429, "login_throttled", "Too many failed logins on this server; retry later.",
                               headers={"Retry-After": str(retry_after)})
        response = login(request, extra_context)
        if request.method == "POST" and response.status_code == 200:
            StaffBasicAuthentication.failed()
        return response

    return view


class HasScope(permissions.BasePermission):
    """Authenticated, and the key carries the view's `required_scope`. A staff user (Basic or session
    auth) passes for `admin` only with the Django model permissions the view names for the method
    (`staff_permissions`): the staff flag alone opens the admin site, not every write in it."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated("Send an API key as `Authorization: Bearer <key>`.")
        scope = getattr(view, "required_scope", None)
        if scope is None:
            return True
        if isinstance(user, Principal):
            # A view may name several scopes, any of which opens it (a job's Location serves the key
            # that made the job as well as a key made to read jobs).
            accepted = (scope,) if isinstance(scope, str) else tuple(scope)
            if any(s in user.scopes for s in accepted):
                return True
            raise ApiError(403, "insufficient_scope",
                           f"This API key lacks the {' or '.join(repr(s) for s in accepted)} scope.",
                           extra={"required_scope": accepted[0]})
        scope = scope if isinstance(scope, str) else scope[0]
        if scope == "admin" and getattr(user, "is_staff", False) and user.is_active:
            method = {"HEAD": "GET", "OPTIONS": "GET"}.get(request.method, request.method)
            needed = getattr(view, "staff_permissions", {}).get(method, ())
            if needed and user.has_perms(needed):
                return True
            raise ApiError(403, "forbidden", f"This staff account lacks the permission {', '.join(needed) or 'for it'}.")
        raise ApiError(403, "forbidden", "Only staff may do this.")


class CustomerRateThrottle(throttling.BaseThrottle):
    """The customer's requests per second with a burst, shared across every API process."""

    def allow_request(self, request: Request, view: APIView) -> bool:
        user = request.user
        if not isinstance(user, Principal):
            return True
        wait = credential_cache().admit(user)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"Too many requests: this account allows {user.rate_per_second:g} "
                           f"a second (bursts of {user.burst}).", headers={"Retry-After": str(max(1, round(wait + 0.5)))})
        return True


def monthly_quota_charge(principal: object) -> None:
    """Count one image against the customer's monthly quota, or refuse with 429 when it is used up.
    Called by the resize view once the request is valid, so refused requests cost nothing."""
    if not isinstance(principal, Principal):
        return
    try:
        if credential_cache().charge_quota(principal):
            return
    except QuotaUnconfirmed as e:
        raise ApiError(503, "quota_unconfirmed", "The monthly quota cannot be confirmed right now; retry shortly.",
                       headers={"Retry-After": "5"}) from e
    now = datetime.now(timezone.utc)
    next_month = (now.replace(day=1) + timedelta(days=32)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ApiError(429, "quota_exceeded", f"The monthly quota of {principal.monthly_quota} images is used up.",
                   headers={"Retry-After": str(int((next_month - now).total_seconds()) + 1)})


def monthly_quota_refund(principal: object) -> None:
    """Give back a charge for a request that made no new job (an idempotent replay, a 503)."""
    if isinstance(principal, Principal):
        credential_cache().refund_quota(principal)


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI document describes our authentication."""

    target_class = "identity.authentication.ApiKeyAuthentication"
    name = "bearer"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer rsz_...`"}


class StaffBasicAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "identity.authentication.StaffBasicAuthentication"
    name = "staffBasic"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "http", "scheme": "basic",
                "description": "A staff user's name and password (the management API only)"}
