"""DRF authentication: `Authorization: Bearer <key>` -> Principal, or 401."""
from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from identity.selectors import Principal, principal_for_key


class ApiKeyAuthentication(authentication.BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Principal, None] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None  # -> NotAuthenticated (401) from the IsAuthenticated permission
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise exceptions.AuthenticationFailed("Send the API key as `Authorization: Bearer <key>`.")
        principal = principal_for_key(key=key.strip())
        if principal is None:
            raise exceptions.AuthenticationFailed("The API key is not valid, or it was revoked.")
        return principal, None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="resizer"'


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """How the OpenAPI document describes our authentication."""

    target_class = "identity.authentication.ApiKeyAuthentication"
    name = "bearer"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An API key: `Authorization: Bearer rsz_...`"}
