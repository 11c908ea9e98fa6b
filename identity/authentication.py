"""DRF glue for the data plane: Bearer-key authentication, scopes, per-customer rate limits and
monthly quotas, all answered from the process's credential cache (identity/dataplane.py)."""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions, throttling
from rest_framework.request import Request

from controlplane.errors import ApiError, problem
from controlplane.metrics import STAFF_LOGINS
from identity.dataplane import AuthFailed, AuthUnavailable, Principal, QuotaUnconfirmed, credential_cache

if TYPE_CHECKING:  # DRF imports this module while rest_framework.views is still loading
    from rest_framework.views import APIView


BEARER_CHALLENGE = 'Bearer realm="resizer"'  # WWW-Authenticate of every 401
SEND_A_KEY = "Send an API key as `Authorization: Bearer <key>`."  # the 401 without credentials


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
        return BEARER_CHALLENGE


class LoginFailures:
    """Failed password checks of the last minute in this process, counted under keys (all logins, one
    user name, one proven client). An attempt counts as a failure from its start until it succeeds:
    checked and counted under one lock, simultaneous attempts cannot all pass a cap before any of them
    is counted (each check takes a third of a second). A key is kept only while it has failures in the
    window."""

    WINDOW = 60

    def __init__(self) -> None:
        self._by_key: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def begin(self, caps: dict[str, int]) -> tuple[int | None, float]:
        """(None, the attempt's stamp) with the attempt counted under every key of `caps`, or (seconds
        to wait, ...) with nothing counted when a key already has its limit of failures in the window."""
        now = time.monotonic()
        with self._lock:
            for key, limit in caps.items():
                failures = self._by_key.get(key)
                while failures and now - failures[0] > self.WINDOW:
                    failures.popleft()
                if failures is not None and len(failures) >= limit:
                    return max(1, int(self.WINDOW + 1 - (now - failures[0]))), now
            for key in caps:
                self._by_key.setdefault(key, deque()).append(now)
            if len(self._by_key) > 10_000:  # keys whose window has passed; the caps bound new keys anyway
                for key in [k for k, f in self._by_key.items() if not f or now - f[-1] > self.WINDOW]:
                    del self._by_key[key]
        return None, now

    def succeeded(self, keys: Iterable[str], stamp: float) -> None:
        """The attempt begun at `stamp` under `keys` was not a failure: it stops counting."""
        with self._lock:
            for key in keys:
                failures = self._by_key.get(key)
                if failures is not None and stamp in failures:
                    failures.remove(stamp)
                    if not failures:
                        del self._by_key[key]


def login_name(username: str) -> str:
    """A user name as Django's login form reads it (NFKC, spaces stripped): the key of its cap, so
    ` ops` or a fullwidth `ｏｐｓ`, which the form logs in as `ops`, count as `ops`."""
    return unicodedata.normalize("NFKC", username).strip()


class StaffBasicAuthentication(authentication.BasicAuthentication):
    """Basic auth for staff on the management API, with failed password checks capped per process:
    each check of a password (right or wrong, known user or not) costs a PBKDF2 of a million rounds,
    about a third of a CPU-second, so unthrottled wrong passwords were both a guessing oracle and a
    way to take the API tier's CPU. Three caps, each over the last minute, refuse with 429 before any
    hashing:
    - FAILURES_PER_MINUTE for all logins together (the CPU bound);
    - FAILURES_PER_USER_PER_MINUTE for one user name (the guessing bound; the name as the login form
      reads it, case folded), so one name's flood leaves the others their share of the first;
    - a client that proved itself before (below) is counted apart, FAILURES_PER_USER_PER_MINUTE on its
      own, and not refused for the others' failures: a flood of wrong passwords, for its name or any,
      does not lock out an operator or a script that has logged in before.
    A Basic client proves itself by sending a user name and password this process verified before: within
    VERIFIED_SECONDS it passes without hashing (an HMAC under a key of this process, compared with the
    one it verified), and after that it is checked again without waiting behind the caps. A browser
    proves itself with the admin's device cookie (admin_login_throttled). Keys with the admin scope and
    the admin's session are not affected."""

    FAILURES_PER_MINUTE = 20
    FAILURES_PER_USER_PER_MINUTE = 5
    VERIFIED_SECONDS = 60
    _failures = LoginFailures()

    # username -> (HMAC of the password, user pk, the user's stored password hash, until)
    _verified: dict[str, tuple[bytes, Any, str, float]] = {}
    _secret = os.urandom(32)
    _lock = threading.Lock()

    def authenticate(self, request: Any) -> Any:
        """Basic credentials, refused on a write a browser sends from another site: a browser holding an
        operator's Basic credentials attaches them to any site's request, and a cross-site form's empty
        POST (text/plain, no preflight) issued a customer a key (found by the security review). Such a
        request says where it comes from (`Sec-Fetch-Site`, `Origin`); scripts send neither."""
        if request.method not in ("GET", "HEAD", "OPTIONS") and _cross_site(request) \
                and authentication.get_authorization_header(request)[:6].lower() == b"basic ":
            raise ApiError(403, "forbidden", "A write with Basic credentials from another site's page is refused; "
                           "send it from a script, or use an API key with the admin scope.")
        return super().authenticate(request)

    def authenticate_credentials(self, userid: str, password: str, request: Any = None) -> Any:
        from django.contrib.auth import get_user_model

        cls = StaffBasicAuthentication
        if "\x00" in userid or "\x00" in password:
            # No account has one (the admin's form refuses them too), and PostgreSQL refuses NUL in the
            # user lookup: an anonymous 500 with a traceback (found by the security review of 2026-11-23).
            # Refused before the caps: no password is checked, so none is counted.
            raise exceptions.AuthenticationFailed("Invalid username/password.")
        digest = hmac.new(cls._secret, password.encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with cls._lock:
            verified = cls._verified.get(userid)
        proven = verified is not None and hmac.compare_digest(verified[0], digest)
        if proven and verified is not None and verified[3] > now:
            user = get_user_model().objects.filter(pk=verified[1], is_active=True).first()
            # The stored hash unchanged: a password changed (or reset) since takes effect at once.
            if user is not None and hmac.compare_digest(user.password, verified[2]):
                return user, None
        retry_after, succeeded = cls.attempt(userid, f"verified:{userid}" if proven else None)
        if retry_after is not None:
            STAFF_LOGINS.labels("basic", "throttled").inc()
            raise ApiError(429, "login_throttled", "Too many failed logins on this server; use an API key "
                           "with the admin scope, or retry later.", headers={"Retry-After": str(retry_after)})
        # The name's verified entry stays on a failure: a flood of wrong passwords for a script's own
        # user name must not log the script out (the entry matches only the password it verified).
        try:
            user, auth = super().authenticate_credentials(userid, password, request)
        except exceptions.AuthenticationFailed:
            STAFF_LOGINS.labels("basic", "failed").inc()
            raise
        succeeded()
        STAFF_LOGINS.labels("basic", "succeeded").inc()
        with cls._lock:
            if len(cls._verified) >= 1000:  # staff accounts are few; a flood of names must not grow it
                cls._verified.clear()
            cls._verified[userid] = (digest, user.pk, user.password, time.monotonic() + cls.VERIFIED_SECONDS)
        return user, auth

    @classmethod
    def attempt(cls, username: str, proof: str | None = None) -> tuple[int | None, Callable[[], None]]:
        """Begin a password check for `username`: (seconds to wait, ...) when a cap it counts against is
        full, else (None, a function to call if the check succeeds; until then it counts as a failure).
        `proof` names a client that proved itself before (counted on its own). Basic logins and the
        admin's login form share the caps (the same PBKDF2 each)."""
        if proof is not None:
            caps = {proof: cls.FAILURES_PER_USER_PER_MINUTE}
        else:
            caps = {"*": cls.FAILURES_PER_MINUTE,
                    f"user:{login_name(username).casefold()[:150]}": cls.FAILURES_PER_USER_PER_MINUTE}
        failures = cls._failures
        retry_after, stamp = failures.begin(caps)
        return retry_after, lambda: failures.succeeded(caps, stamp)


def _cross_site(request: Any) -> bool:
    """Whether a browser sent the request from another origin's page: `Sec-Fetch-Site` says it is not
    same-origin (nor typed by the user: `none`), or an `Origin` is sent, and neither is this host nor
    a trusted origin. Trusted as Django's CSRF check trusts: listed in CSRF_TRUSTED_ORIGINS, exactly or
    by a `*.` wildcard there (`https://*.example.com`). Until 2026-11-23 a wildcard matched nothing, and
    `Sec-Fetch-Site: same-site` was refused before the Origin was read: an operators' tool on
    `https://ops.example.com`, listed, could not write through the API on `api.example.com`."""
    site = request.headers.get("Sec-Fetch-Site")
    if site in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return site is not None  # a browser's request from another site names its origin: refuse
    return not _trusted_origin(origin, request.get_host())


def _trusted_origin(origin: str, host: str) -> bool:
    from django.conf import settings
    from django.utils.http import is_same_domain

    scheme, separator, netloc = origin.partition("://")
    if not separator:
        return False  # `null` (a sandboxed or privacy-sensitive context), or no origin at all
    if netloc == host or origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    return any(is_same_domain(netloc, trusted_netloc[1:])  # `*.example.com` -> `.example.com`
               for trusted_scheme, _, trusted_netloc in (t.partition("://") for t in settings.CSRF_TRUSTED_ORIGINS)
               if trusted_scheme == scheme and trusted_netloc.startswith("*."))


ADMIN_DEVICE_COOKIE = "resizer_admin_device"
ADMIN_DEVICE_DAYS = 30
_ADMIN_DEVICE_SALT = "identity.admin-login-device"


def _password_mark(user: Any) -> str:
    """Changes when the user's password does (a reset after a compromise ends its devices' cookies)."""
    from django.utils.crypto import salted_hmac

    return salted_hmac(_ADMIN_DEVICE_SALT, user.password, algorithm="sha256").hexdigest()[:32]


def _admin_device(request: Any, username: str) -> str | None:
    """The id of the browser's device cookie if it is valid for `username`: signed by this deployment's
    SECRET_KEY when that user logged in from it, within ADMIN_DEVICE_DAYS, and with the password that
    user has now. Else None."""
    from django.contrib.auth import get_user_model
    from django.core import signing

    value = request.COOKIES.get(ADMIN_DEVICE_COOKIE)
    if not value:
        return None
    try:
        device = signing.loads(value, salt=_ADMIN_DEVICE_SALT, max_age=timedelta(days=ADMIN_DEVICE_DAYS))
    except signing.BadSignature:
        return None
    if (not isinstance(device, dict) or device.get("u") != login_name(username)
            or not isinstance(device.get("d"), str) or not isinstance(device.get("p"), str)):
        return None
    model = get_user_model()
    user = model._default_manager.filter(**{model.USERNAME_FIELD: device["u"], "is_active": True}).first()
    if user is None or not hmac.compare_digest(device["p"], _password_mark(user)):
        return None
    return device["d"]


def _login_throttled(request: Any, retry_after: int) -> Any:
    """The form's 429: a page for a browser (an operator saw the problem document's JSON), the problem
    document for anything else; the same code and sentence in both."""
    from django.http import HttpResponse
    from django.utils.html import escape

    detail = "Too many failed logins on this server; retry later."
    headers = {"Retry-After": str(retry_after), "Vary": "Accept"}
    if "text/html" not in request.META.get("HTTP_ACCEPT", ""):
        return problem(429, "login_throttled", detail, headers=headers)
    page = (f"<!doctype html><html lang=\"en\"><title>Too many failed logins</title><h1>Too many failed logins</h1>"
            f"<p>{escape(detail)} Wait {retry_after} s, then <a href=\"{escape(request.get_full_path())}\">try "
            f"again</a>. (code <code>login_throttled</code>)</p></html>")
    response = HttpResponse(page, status=429, content_type="text/html; charset=utf-8", headers=headers)
    response._has_been_logged = True  # a refusal we chose, as problem() marks it
    return response


def admin_login_throttled(login: Any) -> Any:
    """Django admin's login view under the same caps of failed logins as Basic auth: the form checked
    every password it was sent (a million-round PBKDF2 each, a guessing oracle and a third of a
    CPU-second), and a session it opens also reaches the management API. Past a cap a POST is refused
    with 429 before any hashing; a failed login is the form answered again (200). A successful login
    leaves a device cookie (OWASP's "device cookies"): a later login of that user from that browser is
    counted on its own and not refused for anyone else's failures, so a flood of wrong passwords does
    not lock out operators who have logged in before."""
    from django.core import signing

    @functools.wraps(login)
    def view(request: Any, extra_context: Any = None) -> Any:
        if request.method != "POST":
            return login(request, extra_context)
        username = str(request.POST.get("username", ""))
        device = _admin_device(request, username)
        retry_after, succeeded = StaffBasicAuthentication.attempt(username, f"device:{device}" if device else None)
        if retry_after is not None:
            STAFF_LOGINS.labels("form", "throttled").inc()
            return _login_throttled(request, retry_after)
        response = login(request, extra_context)
        if response.status_code == 200:
            STAFF_LOGINS.labels("form", "failed").inc()
            return response  # the form again: a failed login (it stays counted)
        succeeded()  # logged in, or no password checked
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            STAFF_LOGINS.labels("form", "succeeded").inc()
            response.set_cookie(
                ADMIN_DEVICE_COOKIE,
                signing.dumps({"u": user.get_username(), "d": os.urandom(12).hex(), "p": _password_mark(user)},
                              salt=_ADMIN_DEVICE_SALT),
                max_age=ADMIN_DEVICE_DAYS * 86400, path="/admin/", secure=request.is_secure(), httponly=True,
                samesite="Lax")
        return response

    return view


class HasScope(permissions.BasePermission):
    """Authenticated, and the key carries the view's `required_scope`. A staff user (Basic or session
    auth) passes for `admin` only with the Django model permissions the view names for the method
    (`staff_permissions`): the staff flag alone opens the admin site, not every write in it."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        user = request.user
        if user is None or not getattr(user, "is_authenticated", False):
            raise exceptions.NotAuthenticated(SEND_A_KEY)
        if not hasattr(view, request.method.lower()):
            # A method the view does not take: DRF's 405 follows. Judged here first, a superuser's PUT
            # was 403 "this staff account lacks the permission" (no permission is named for PUT).
            return True
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
