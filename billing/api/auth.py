"""Bearer API-key authentication and per-view scopes."""

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from billing.models import ApiKey
from billing.services.api_keys import api_key_authenticate
from billing.services.refresh_ahead import refresh_later

LAST_USED_RESOLUTION = timedelta(minutes=1)  # avoid a write on every request


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"
    cached_only = False  # see CachedApiKeyAuthentication

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, key = header.partition(" ")
        if scheme != self.keyword or not key.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        api_key = api_key_authenticate(key.strip(), cached_only=self.cached_only)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid or revoked API key.")
        now = timezone.now()
        if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
            if self.cached_only:  # recorded in the background: the event loop never writes
                refresh_later(f"api-key-used:{api_key.pk}", lambda: _record_use(api_key, now))
            else:
                _record_use(api_key, now)
        return (None, api_key)

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when the key is missing.
        return self.keyword


def _record_use(api_key: ApiKey, now) -> None:
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    api_key.last_used_at = now  # the object may be the process's cached copy


class CachedApiKeyAuthentication(ApiKeyAuthentication):
    """The same authentication without the database (the check server's event loop, which
    must not block on PostgreSQL): a key this process has not authenticated lately raises
    NeedsDatabase; a last use due to be recorded is recorded in the background."""

    cached_only = True


class HasApiKeyScope(permissions.BasePermission):
    """The view's `required_scope` (or `required_scopes[method]`) must be one of the
    key's scopes."""

    message = "This API key does not have the scope this endpoint needs."

    def has_permission(self, request, view):
        api_key = request.auth
        if not isinstance(api_key, ApiKey):
            raise exceptions.NotAuthenticated("Send an API key as 'Authorization: Bearer <key>'.")
        scope = getattr(view, "required_scopes", {}).get(request.method) or getattr(view, "required_scope", None)
        if scope is None:
            return False  # a view that forgot to declare its scope is closed, not open
        return api_key.has_scope(scope)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "billing.api.auth.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {"type": "http", "scheme": "bearer", "description": "An Overage API key: `Bearer ovg_…`"}
