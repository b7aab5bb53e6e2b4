"""Integrators' API keys: `ovg_<prefix>_<secret>`; only a SHA-256 of the whole key is
stored, and the key is shown once."""

import hashlib
import hmac
import secrets
import time
from datetime import datetime

from django.conf import settings
from django.db import transaction

from billing.errors import NeedsDatabase
from billing.models import ApiKey
from billing.services.refresh_ahead import refresh_later

ALL_SCOPES = [choice.value for choice in ApiKey.Scope]


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@transaction.atomic
def api_key_create(*, name: str, scopes: list[str] | None = None) -> tuple[ApiKey, str]:
    """Create a key; returns (row, plaintext key). With no scopes, every scope."""
    scopes = list(dict.fromkeys(scopes or ALL_SCOPES))
    unknown = set(scopes) - set(ALL_SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))} (choose from {', '.join(ALL_SCOPES)})")
    prefix = secrets.token_hex(6)
    key = f"ovg_{prefix}_{secrets.token_urlsafe(32)}"
    api_key = ApiKey(name=name, prefix=prefix, key_hash=_hash(key), scopes=scopes)
    api_key.full_clean()
    api_key.save()
    return api_key, key


# Keys this process authenticated lately: hash → (key, when). Every API call is
# authenticated, and ingestion is the hot path; a revocation reaches other processes
# within OVERAGE_API_KEY_CACHE_SECONDS (this one at once, see api_key_revoke).
_recently_authenticated: dict[str, tuple[ApiKey, float]] = {}
_RECENT_MAX = 1000


def api_key_authenticate(key: str, *, cached_only: bool = False) -> ApiKey | None:
    """The active key matching `key`, or None. Compared in constant time. With
    `cached_only`, a key this process has not authenticated lately raises NeedsDatabase
    instead of being looked up."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "ovg":
        return None
    digest = _hash(key)
    recent = _recently_authenticated.get(digest)
    if recent is not None:
        age = time.monotonic() - recent[1]
        if age < settings.OVERAGE_API_KEY_CACHE_SECONDS:
            if cached_only and age >= settings.OVERAGE_API_KEY_CACHE_SECONDS / 2:
                # Looked up again in the background before it expires, so that the checks of
                # the instant it expires are not all sent to the database at once.
                refresh_later(f"api-key:{digest}", lambda: _look_up(parts[1], digest))
            return recent[0]
    if cached_only:
        raise NeedsDatabase("API key not authenticated by this process lately")
    return _look_up(parts[1], digest)


def _look_up(prefix: str, digest: str) -> ApiKey | None:
    api_key = ApiKey.objects.filter(prefix=prefix, revoked_at__isnull=True).first()
    if api_key is None or not hmac.compare_digest(api_key.key_hash, digest):
        _recently_authenticated.pop(digest, None)
        return None
    if len(_recently_authenticated) >= _RECENT_MAX:
        _recently_authenticated.clear()
    _recently_authenticated[digest] = (api_key, time.monotonic())
    return api_key


def api_key_revoke(*, api_key: ApiKey, now: datetime) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = now
        api_key.save(update_fields=["revoked_at"])
    for digest, (cached, _) in list(_recently_authenticated.items()):
        if cached.pk == api_key.pk:
            _recently_authenticated.pop(digest, None)
    return api_key
