"""Integrators' API keys: `ovg_<prefix>_<secret>`; only a SHA-256 of the whole key is
stored, and the key is shown once."""

import hashlib
import hmac
import secrets
from datetime import datetime

from django.db import transaction

from billing.models import ApiKey

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


def api_key_authenticate(key: str) -> ApiKey | None:
    """The active key matching `key`, or None. Compared in constant time."""
    parts = key.split("_")
    if len(parts) < 3 or parts[0] != "ovg":
        return None
    api_key = ApiKey.objects.filter(prefix=parts[1], revoked_at__isnull=True).first()
    if api_key is None or not hmac.compare_digest(api_key.key_hash, _hash(key)):
        return None
    return api_key


def api_key_revoke(*, api_key: ApiKey, now: datetime) -> ApiKey:
    if api_key.revoked_at is None:
        api_key.revoked_at = now
        api_key.save(update_fields=["revoked_at"])
    return api_key
